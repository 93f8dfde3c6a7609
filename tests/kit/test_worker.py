"""Celery round trip through a real worker, and enqueue-after-commit."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from atrium.app import create_app
from atrium.kit.db import DBSession
from atrium.kit.enqueue import enqueue, pending_jobs
from atrium.kit.errors import Conflict

#: tests.support.tasks.RECORD_TASK (importing that module here would build the Celery app
#: before the session's settings exist).
RECORD_TASK = "tests.record"


async def _wait_key(redis: Any, key: str, timeout: float = 20.0) -> str | None:
    for _ in range(int(timeout / 0.1)):
        value = await redis.get(key)
        if value is not None:
            return str(value)
        await asyncio.sleep(0.1)
    return None


async def test_task_round_trip_through_the_worker(celery_worker: Any) -> None:
    from atrium.worker import celery_app

    result = celery_app.send_task("atrium.ping", kwargs={"payload": "hello"})
    value = await asyncio.to_thread(result.get, timeout=30)
    assert value == {"payload": "hello", "db": 1, "vector": 1, "redis": True}


async def test_ping_cannot_write_redis_keys(app: Any, celery_worker: Any) -> None:
    """Anyone who reaches the broker can send atrium.ping: it must not write what they ask."""
    from atrium.worker import celery_app

    key = f"t:{uuid.uuid4()}"
    result = celery_app.send_task("atrium.ping", kwargs={"payload": "owned", "record_key": key})
    with pytest.raises(TypeError, match="record_key"):
        await asyncio.to_thread(result.get, timeout=30)
    assert await app.state.redis.get(key) is None


async def test_job_of_a_rolled_back_request_is_never_sent(app: Any, celery_worker: Any) -> None:
    test_app = create_app(app.state.settings)
    sent_key, dropped_key = f"t:{uuid.uuid4()}", f"t:{uuid.uuid4()}"

    @test_app.post("/commit")
    async def commit(session: DBSession) -> dict[str, int]:
        enqueue(session, RECORD_TASK, key=sent_key, value="committed")
        return {"pending": len(pending_jobs(session))}

    @test_app.post("/rollback")
    async def rollback(session: DBSession) -> None:
        enqueue(session, RECORD_TASK, key=dropped_key, value="rolled back")
        raise Conflict("this request fails after enqueueing")

    async with LifespanManager(test_app):
        transport = httpx.ASGITransport(app=test_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/rollback")
            assert r.status_code == 409
            assert r.json() == {
                "error": "Conflict",
                "detail": "this request fails after enqueueing",
            }
            r = await c.post("/commit")
            assert r.status_code == 200
            assert r.json() == {"pending": 1}
        redis = test_app.state.redis
        assert await _wait_key(redis, sent_key) == "committed"
        # The committed job ran after the rolled-back one would have; it is still absent.
        assert await redis.get(dropped_key) is None
