"""The local blob store through obstore: put, get, delete, delete a tenant's prefix."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from atrium.config import load_settings
from atrium.kit.blobstore import get_blobstore, tenant_prefix


async def test_local_blob_store_round_trip(tmp_path: Path) -> None:
    store = get_blobstore(load_settings(data_dir=tmp_path, blob_url=""))
    tenant, other = uuid.uuid4(), uuid.uuid4()
    await store.put(f"{tenant_prefix(tenant)}a/1.bin", b"one")
    await store.put(f"{tenant_prefix(tenant)}b/2.bin", b"two")
    await store.put(f"{tenant_prefix(other)}c.bin", b"three")
    assert await store.get(f"{tenant_prefix(tenant)}a/1.bin") == b"one"
    assert await store.delete_prefix(tenant_prefix(tenant)) == 2
    with pytest.raises(FileNotFoundError):
        await store.get(f"{tenant_prefix(tenant)}a/1.bin")
    assert await store.get(f"{tenant_prefix(other)}c.bin") == b"three"
    await store.delete(f"{tenant_prefix(other)}c.bin")
    await store.delete(f"{tenant_prefix(other)}c.bin")  # missing is fine
    assert await store.delete_prefix(tenant_prefix(other)) == 0
