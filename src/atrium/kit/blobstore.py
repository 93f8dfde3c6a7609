"""Raw document bytes: a local directory by default, S3-compatible storage when configured.

Both go through obstore's one interface, so code never branches on where blobs live. Keys are
``tenants/<tenant_id>/...``: purging a tenant deletes one prefix.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import obstore
from obstore.store import LocalStore, S3Store

from atrium.config import Settings


class BlobStore:
    """A thin async facade over an obstore store."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (overwrites)."""
        await obstore.put_async(self.store, key, data)

    async def get(self, key: str) -> bytes:
        """The bytes under ``key``.

        Raises:
            FileNotFoundError: when nothing is stored there.
        """
        result = await obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        try:
            await obstore.delete_async(self.store, key)
        except FileNotFoundError:
            return

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many."""
        paths: list[str] = []
        async for batch in obstore.list(self.store, prefix=prefix, chunk_size=1000):
            paths.extend(str(meta["path"]) for meta in batch)
        if paths:
            for start in range(0, len(paths), 1000):
                await obstore.delete_async(self.store, paths[start : start + 1000])
        return len(paths)


def tenant_prefix(tenant_id: object) -> str:
    """The prefix under which all of a tenant's blobs live."""
    return f"tenants/{tenant_id}/"


@lru_cache(maxsize=8)
def _store(blob_url: str, local_root: str) -> BlobStore:
    if blob_url.startswith("s3://"):
        # Credentials and endpoint come from the standard AWS_* environment variables.
        bucket, _, prefix = blob_url[len("s3://") :].partition("/")
        return BlobStore(S3Store(bucket, prefix=prefix or None))
    Path(local_root).mkdir(parents=True, exist_ok=True)
    return BlobStore(LocalStore(local_root, mkdir=True))


def get_blobstore(settings: Settings) -> BlobStore:
    """The configured blob store."""
    return _store(settings.blob_url, str((settings.data_dir / "blobs").resolve()))
