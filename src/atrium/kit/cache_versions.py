"""Collection versions: part of every search cache key, bumped by every write.

Kept in Redis beside the cache itself, so losing Redis loses both together and a stale entry can
never outlive the version that made it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from redis.asyncio import Redis

_KEY = "atrium:cv:{tenant}:{collection}"


def _key(tenant_id: uuid.UUID, collection_id: uuid.UUID) -> str:
    return _KEY.format(tenant=tenant_id, collection=collection_id)


async def bump_collection_version(
    redis: Redis, tenant_id: uuid.UUID, collection_id: uuid.UUID
) -> int:
    """Mark a collection changed (upload, delete, re-index); returns the new version."""
    return int(await redis.incr(_key(tenant_id, collection_id)))


async def collection_versions(
    redis: Redis, tenant_id: uuid.UUID, collection_ids: Sequence[uuid.UUID]
) -> list[int]:
    """The current version of each collection (0 if never changed), in order."""
    if not collection_ids:
        return []
    values = await redis.mget([_key(tenant_id, c) for c in collection_ids])
    return [int(v) if v is not None else 0 for v in values]
