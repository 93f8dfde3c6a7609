"""The API key records cached in Redis: their names, their shape, and one shared reader.

Authentication (:mod:`atrium.auth.api_keys`) reads them on every request; the key
lifecycle (:mod:`atrium.apikeys.service`) writes them: revocation and rotation overwrite a key's
record (:func:`publish_record`), so a revoked key is refused on the very next request, and a new
key drops the "does not exist" markers of its HMAC (:func:`forget_misses`). Both sides use this
module, so the names and the record's JSON are defined once.

Redis keys (every one carries the tenant id, but the last):

- ``atrium:t:<tenant>:apikey:<hmac>``: the key record as JSON, or a marker for a key that does
  not exist (``unknown``) or belongs to another tenant (``foreign``);
- ``atrium:t:<tenant>:status``: the tenant's status, for a few seconds
  (:mod:`atrium.tenants.status`, which also forgets it when the status changes);
- ``atrium:t:<tenant>:apikey-used:<key id>``: the last-used debounce;
- ``atrium:apikey-unknown:<hmac>``: a key that does not exist, as
  :func:`~atrium.auth.api_keys.tenant_of_key` (whose caller names no tenant) found it;
  for ``NEGATIVE_TTL_SECONDS``.

Creating or rotating a key drops both "does not exist" markers of the new key's HMAC once the
key is committed, so a key is never refused because someone tried it before it existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.db import after_commit
from atrium.models import ApiKey

T = TypeVar("T")

#: How long a key record stays in Redis. Revocation and rotation overwrite it at once, so this
#: only bounds memory and changes made outside :mod:`atrium.apikeys`.
RECORD_TTL_SECONDS = 300
#: How long a "no such key" / "another tenant's key" answer is remembered.
NEGATIVE_TTL_SECONDS = 60
#: The cached answer for a key that does not exist.
UNKNOWN = "unknown"
#: The cached answer, on a tenant's paths, for a key of another tenant.
FOREIGN = "foreign"


def record_cache_key(tenant_id: uuid.UUID | str, digest: str) -> str:
    """Redis key of a cached key record, as seen from ``tenant_id``'s paths."""
    return f"atrium:t:{tenant_id}:apikey:{digest}"


def touch_cache_key(tenant_id: uuid.UUID | str, key_id: uuid.UUID | str) -> str:
    """Redis key of a key's last-used debounce."""
    return f"atrium:t:{tenant_id}:apikey-used:{key_id}"


def unknown_key_cache_key(digest: str) -> str:
    """Redis key of :func:`~atrium.auth.api_keys.tenant_of_key`'s "no such key" marker
    (no tenant: the caller names none, and a key that does not exist has none)."""
    return f"atrium:apikey-unknown:{digest}"


class CoalescingReader:
    """Reads Redis keys for concurrent requests with one ``MGET`` per event-loop turn.

    Every request still reads Redis after it arrived, so a revocation written before a request
    starts is always seen; requests that reach authentication in the same loop turn (a busy
    API worker has dozens in flight) share one round trip instead of paying one each. A lone
    request waits one loop turn more.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: dict[str, list[asyncio.Future[str | None]]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loads: dict[str, asyncio.Task[Any]] = {}

    async def mget(self, *keys: str) -> list[str | None]:
        """The values of ``keys`` (None where missing), read in the next shared ``MGET``."""
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = {}
            # The flush starts after every callback already queued in this turn has run, so
            # it collects all the requests that got here meanwhile.
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        futures = []
        for key in keys:
            future: asyncio.Future[str | None] = loop.create_future()
            self._pending.setdefault(key, []).append(future)
            futures.append(future)
        return [await f for f in futures]

    async def _flush(self) -> None:
        batch, self._pending = self._pending or {}, None
        names = list(batch)
        try:
            values = await self.redis.mget(names)
        except BaseException as exc:
            for waiting in batch.values():
                for f in waiting:
                    if not f.done():
                        f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for name, value in zip(names, values, strict=True):
            for f in batch[name]:
                if not f.done():  # its request may have been cancelled (client went away)
                    f.set_result(None if value is None else str(value))

    async def load_once(self, key: str, load: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``load()`` once for all the requests that miss ``key`` at the same time.

        When a cached entry expires, every request in flight misses it at once; without this
        they would all query the database. The load runs in its own task, so a request that
        goes away does not cancel it for the others.
        """
        task = self._loads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(load())
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
        result: T = await asyncio.shield(task)
        return result


def shared_reader(state: Any) -> CoalescingReader:
    """The app's reader (one per ``app.state``, made anew when its Redis client changes)."""
    reader: CoalescingReader | None = getattr(state, "apikey_reader", None)
    if reader is None or reader.redis is not state.redis:
        reader = CoalescingReader(state.redis)
        state.apikey_reader = reader
    return reader


def _epoch(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def encode_record(key: ApiKey) -> str:
    """The cached record of ``key``: what authentication needs, as compact JSON."""
    return json.dumps(
        {
            "id": str(key.id),
            "tenant": str(key.tenant_id),
            "user": str(key.created_by_user_id) if key.created_by_user_id else None,
            "scopes": list(key.scopes),
            "expires": _epoch(key.expires_at),
            "revoked": _epoch(key.revoked_at),
            "rpm": key.rate_limit_per_minute,
        },
        separators=(",", ":"),
    )


async def publish_record(redis: Redis, key: ApiKey) -> None:
    """Overwrite the cached record so the next request sees the change (no stale window)."""
    await redis.set(
        record_cache_key(key.tenant_id, key.key_hash), encode_record(key), ex=RECORD_TTL_SECONDS
    )


async def forget_misses(session: AsyncSession, redis: Redis, key: ApiKey) -> None:
    """Drop the "does not exist" markers of a new key's HMAC (its tenant's paths and
    :func:`~atrium.auth.api_keys.tenant_of_key`'s) once ``session`` commits, so the key
    works at once even if someone tried it before it existed. After the commit, never before: a
    request in between would read no row and mark it unknown again. Nobody holds the secret
    before the response that carries it, which goes out after this."""
    names = (record_cache_key(key.tenant_id, key.key_hash), unknown_key_cache_key(key.key_hash))

    async def hook(committed: bool) -> None:
        if committed:
            await redis.delete(*names)

    if not after_commit(session, hook):
        await redis.delete(*names)
