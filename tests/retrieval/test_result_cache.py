"""Queued result-cache fills: carried by a later round trip, or sent alone soon after."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from atrium.kit.redis import create_redis
from atrium.retrieval.cache import CARRY_SECONDS, MAX_PENDING, PendingWrites

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _key() -> str:
    return f"atrium-cache:search:test:{uuid.uuid4()}"


async def test_a_queued_fill_is_sent_alone_after_a_short_wait_unless_carried(app: Any) -> None:
    redis = app.state.redis_bytes
    writes = PendingWrites(redis)
    alone, carried = _key(), _key()
    writes.add(alone, b'{"n": 1}', 60)
    assert len(writes) == 1 and await redis.get(alone) is None
    await asyncio.sleep(CARRY_SECONDS * 4)
    assert await redis.get(alone) == b'{"n": 1}' and len(writes) == 0
    assert 55 <= await redis.ttl(alone) <= 60
    # Taken by a round trip: the commands are what it sends, and the timer sends nothing.
    writes.add(carried, b'{"n": 2}', 30)
    assert writes.take() == [("SET", carried, b'{"n": 2}', "EX", 30)]
    await asyncio.sleep(CARRY_SECONDS * 4)
    assert await redis.get(carried) is None
    # A zero TTL (the cache is off) queues nothing.
    writes.add(_key(), b"{}", 0)
    assert len(writes) == 0
    await redis.delete(alone)


async def test_a_burst_is_sent_at_once_and_close_sends_what_is_left(app: Any) -> None:
    redis = app.state.redis_bytes
    writes = PendingWrites(redis)
    keys = [_key() for _ in range(MAX_PENDING)]
    for key in keys:
        writes.add(key, b"{}", 60)
    await asyncio.sleep(CARRY_SECONDS / 5)  # well before the carry wait is over
    assert len(writes) == 0 and all(await redis.mget(keys))
    last = _key()
    writes.add(last, b"{}", 60)
    await writes.close()
    assert await redis.get(last) == b"{}"
    await redis.delete(*keys, last)


async def test_a_fill_that_cannot_be_written_is_logged_not_raised() -> None:
    # A real connection refused: nothing listens on port 9.
    dead = create_redis("redis://127.0.0.1:9/0", decode_responses=False)
    writes = PendingWrites(dead)
    writes.add(_key(), b"{}", 60)
    with capture_logs() as logs:
        await writes.close()
    assert [e["event"] for e in logs] == ["search_cache_write_failed"]
    await dead.aclose()
