"""The search result cache: fastapi-cache2's Redis backend, keyed by request.

The key holds the tenant, the normalised request, the embedding model and the current version
of every collection searched (:mod:`atrium.kit.cache_versions`). A write to a collection bumps
its version, so later searches compute a new key and never see results from before the write;
old entries simply expire.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi_cache import FastAPICache

NAMESPACE = "search"


def cache_key(
    tenant_id: uuid.UUID,
    request: dict[str, Any],
    collection_ids: Sequence[uuid.UUID],
    versions: Sequence[int],
    model: str,
) -> str:
    """The cache key of a normalised request against these collection versions."""
    payload = json.dumps(
        {
            "r": request,
            "c": [str(c) for c in collection_ids],
            "v": list(versions),
            "m": model,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return f"{FastAPICache.get_prefix()}:{NAMESPACE}:{tenant_id}:{digest}"


async def get(key: str) -> bytes | None:
    """The cached response body under ``key`` (JSON), if any."""
    raw = await FastAPICache.get_backend().get(key)
    return raw if isinstance(raw, bytes) else None


async def put(key: str, body: bytes, ttl: int) -> None:
    """Store a response body (JSON) for ``ttl`` seconds.

    The body is stored as the response was serialised: no second encoding (fastapi-cache's
    coder would turn it into a dict and back).
    """
    if ttl <= 0:
        return
    await FastAPICache.get_backend().set(key, body, expire=ttl)
