"""The search result cache: fastapi-cache2's Redis backend, keyed by request.

The key holds the tenant, the normalised request, the embedding model and the current version
of every collection searched (:mod:`atrium.kit.cache_versions`). A write to a collection bumps
its version, so later searches compute a new key and never see results from before the write;
old entries simply expire.

The ``/search`` route does not send its result's ``SET`` in a round trip of its own: it queues
it in the app's :class:`PendingWrites`, and the next search's quota hold carries it in its
pipeline (or it goes alone after :data:`CARRY_SECONDS`). Only a cache fill waits: a search
never reads a result that another search has not finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi_cache import FastAPICache
from redis.asyncio import Redis

log = structlog.get_logger("atrium.retrieval")

#: How long a queued cache write waits for a search's round trip before it is sent alone.
CARRY_SECONDS = 0.05
#: Queued writes beyond this many are sent at once (a burst of distinct searches).
MAX_PENDING = 64

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


class PendingWrites:
    """Result-cache writes of one app waiting for a Redis round trip to carry them.

    Storing a result on its own costs a search one more round trip (about 5% of the route's
    CPU here). Queued with :meth:`add`, it goes in the next search's quota pipeline
    (:meth:`take`), or after :data:`CARRY_SECONDS` in a pipeline of its own (:meth:`flush`).
    A write lost meanwhile (the process is killed) costs one cache miss; a failed one is
    logged, never raised to a caller.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._items: dict[str, tuple[bytes, int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: str, body: bytes, ttl: int) -> None:
        """Queue ``body`` under ``key`` for ``ttl`` seconds (dropped when ``ttl`` <= 0)."""
        if ttl <= 0:
            return
        self._items[key] = (body, ttl)
        if len(self._items) >= MAX_PENDING:
            self._schedule(0)
        elif self._timer is None:
            self._schedule(CARRY_SECONDS)

    def take(self) -> list[tuple[Any, ...]]:
        """The queued writes as ``SET`` commands, for another round trip to send; the queue
        is emptied."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items = self._items, {}
        return [("SET", key, body, "EX", ttl) for key, (body, ttl) in items.items()]

    async def flush(self) -> None:
        """Send what is queued now, in one pipeline."""
        commands = self.take()
        if not commands:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # a cache fill is never worth a failure
            log.warning("search_cache_write_failed", writes=len(commands), error=str(exc))
            return
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            log.warning("search_cache_write_failed", writes=len(failed), error=str(failed[0]))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        # Kept until done: the loop holds only a weak reference to a task.
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def close(self) -> None:
        """Send what is queued (the app is stopping)."""
        await self.flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
