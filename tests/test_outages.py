"""A dependency that goes away answers 503 with Retry-After, fast, and the API recovers alone.

Redis here is a private ``redis-server`` (the suite's own is shared by other test processes and
never stopped); the app under test is a second one pointed at it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from atrium.kit.errors import outage_of
from tests.support.apikeys import key_header
from tests.support.factories import create_tenant, create_user
from tests.test_outbox import Broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[Broker]:
    server = Broker(_free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_app(
    app: Any, settings: Any, private_redis: Broker, clean_state: None
) -> AsyncIterator[Any]:
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend

    from atrium.app import create_app
    from atrium.config import load_settings

    other = create_app(load_settings(**{**settings.model_dump(), "redis_url": private_redis.url}))
    try:
        async with LifespanManager(other, startup_timeout=60):
            yield other
    finally:
        # fastapi-cache2 is a process-wide singleton, which this second app pointed at its
        # private Redis (stopped after the test): give it back to the session's app.
        FastAPICache.reset()
        FastAPICache.init(RedisBackend(app.state.redis_bytes), prefix="atrium-cache")


async def test_redis_outage_answers_503_then_recovers(
    redis_app: Any, private_redis: Broker
) -> None:
    owner = await create_user(redis_app)
    tenant = await create_tenant(redis_app, owner)
    # A key made through the API, as a developer has one.
    from tests.support.factories import bearer

    transport = httpx.ASGITransport(
        app=redis_app, client=("127.0.0.1", 50009), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", timeout=30
    ) as client:
        r = await client.post(
            f"/v1/tenants/{tenant.id}/api-keys",
            json={"name": "k", "scopes": ["collections:read"]},
            headers=await bearer(owner),
        )
        assert r.status_code == 201, r.text
        headers = key_header(r.json()["key"])
        url = f"/v1/tenants/{tenant.id}/collections"
        assert (await client.get(url, headers=headers)).status_code == 200

        private_redis.stop()
        for _ in range(3):
            started = time.monotonic()
            r = await client.get(url, headers=headers)
            elapsed = time.monotonic() - started
            # Authentication needs Redis (revocations, rate limits): it fails closed, at once.
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            assert r.json()["error"] == "ServiceUnavailable" and "Redis" in r.json()["detail"]
            assert elapsed < 2.0, f"the 503 took {elapsed:.2f} s"

        private_redis.start()  # back, empty (no persistence): caches and buckets rebuild
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text


def test_outages_are_recognised_through_their_causes() -> None:
    import redis.exceptions
    from sqlalchemy.exc import OperationalError

    outer = RuntimeError("wrapped")
    outer.__cause__ = redis.exceptions.ConnectionError("Connection refused")
    assert outage_of(outer) == "Redis"
    locked = OperationalError("BEGIN IMMEDIATE", None, Exception("database is locked"))
    assert outage_of(locked) == "the account database"
    assert outage_of(ValueError("a bug")) is None
