"""Collection versions and the catalog token: what search caches are checked against.

One Redis hash per tenant, ``atrium:cv:<tenant>``, read whole by every search in one round trip:

- a field per collection: its version, part of every search cache key, bumped by every write
  to the collection (upload, delete, re-index), so a later search computes a new key and never
  sees results from before the write;
- ``_catalog``: a random token replaced whenever the set of searchable collections or the
  documents being deleted change (a collection created or deleted, a document deleted). Search
  processes keep the tenant's collection list in memory under this token and read the account
  database again only when it has changed.

Kept in Redis beside the result cache itself, so losing Redis loses both together and a stale
entry can never outlive the version that made it (a missing token is simply a new one).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.db import after_commit

_KEY = "atrium:cv:{tenant}"
CATALOG_FIELD = "_catalog"


def _key(tenant_id: uuid.UUID) -> str:
    return _KEY.format(tenant=tenant_id)


async def bump_collection_version(
    redis: Redis, tenant_id: uuid.UUID, collection_id: uuid.UUID
) -> int:
    """Mark a collection changed (upload, delete, re-index); returns the new version."""
    return int(await redis.hincrby(_key(tenant_id), str(collection_id), 1))


async def collection_versions(
    redis: Redis, tenant_id: uuid.UUID, collection_ids: Sequence[uuid.UUID]
) -> list[int]:
    """The current version of each collection (0 if never changed), in order."""
    if not collection_ids:
        return []
    values = await redis.hmget(_key(tenant_id), [str(c) for c in collection_ids])
    return [int(v) if v is not None else 0 for v in values]


@dataclass(frozen=True)
class TenantVersions:
    """Everything a search checks its caches against, from one ``HGETALL``."""

    catalog: str
    versions: dict[str, int]

    def of(self, collection_ids: Sequence[uuid.UUID]) -> list[int]:
        """The versions of these collections, in order (0 if never changed)."""
        return [self.versions.get(str(c), 0) for c in collection_ids]


def versions_command(tenant_id: uuid.UUID) -> tuple[str, str]:
    """The read behind :func:`tenant_versions`, to send in another round trip's pipeline."""
    return ("HGETALL", _key(tenant_id))


async def tenant_versions(
    redis: Redis, tenant_id: uuid.UUID, reply: Mapping[Any, Any] | None = None
) -> TenantVersions:
    """The tenant's catalog token and collection versions (one round trip, two when the
    token must first be created: the first search after a Redis flush).

    Args:
        redis: the app's Redis client.
        tenant_id: whose versions.
        reply: the reply to :func:`versions_command` when it was already sent.
    """
    if reply is None:
        reply = await redis.hgetall(_key(tenant_id))
    # The app's Redis client decodes replies, so fields and values are str.
    raw = {str(k): str(v) for k, v in reply.items()}
    token = raw.pop(CATALOG_FIELD, None)
    if token is None:
        # Created before the caller reads the catalog: a change committed after that read
        # replaces the token, so what is read now is never kept past a change.
        fresh = uuid.uuid4().hex
        if await redis.hsetnx(_key(tenant_id), CATALOG_FIELD, fresh):
            token = fresh
        else:
            token = str(await redis.hget(_key(tenant_id), CATALOG_FIELD))
    return TenantVersions(token, {k: int(v) for k, v in raw.items()})


async def new_catalog_token(redis: Redis, tenant_id: uuid.UUID) -> None:
    """Say the tenant's searchable collections or deleted documents changed (after commit)."""
    await redis.hset(_key(tenant_id), CATALOG_FIELD, uuid.uuid4().hex)


def catalog_changed(session: AsyncSession, redis: Redis, tenant_id: uuid.UUID) -> None:
    """Replace the tenant's catalog token once ``session``'s unit of work has committed.

    After the commit, never before: a search reading the old rows in between would keep them
    under the new token.

    Raises:
        RuntimeError: ``session`` is not an open unit of work (call
            :func:`new_catalog_token` after your own commit instead).
    """

    async def hook(committed: bool) -> None:
        if committed:
            await new_catalog_token(redis, tenant_id)

    if not after_commit(session, hook):
        raise RuntimeError("catalog_changed() needs an open unit of work")
