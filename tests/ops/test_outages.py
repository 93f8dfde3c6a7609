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
from tests.support.broker import Broker
from tests.support.factories import create_tenant, create_user


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
        # The MCP endpoint authenticates the same key the same way (one JSON-RPC call, no
        # handshake: the server is stateless).
        mcp_headers = {
            **headers,
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-06-18",
        }
        tools_list = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        r = await client.post("/mcp", json=tools_list, headers=mcp_headers)
        assert r.status_code == 200, r.text

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
        r = await client.post("/mcp", json=tools_list, headers=mcp_headers)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5" and r.json()["error"] == "ServiceUnavailable"

        private_redis.start()  # back, empty (no persistence): caches and buckets rebuild
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        r = await client.post("/mcp", json=tools_list, headers=mcp_headers)
        assert r.status_code == 200, r.text


@pytest.fixture
async def quota_redis_app(
    app: Any, settings: Any, private_redis: Broker, clean_state: None
) -> AsyncIterator[Any]:
    """The quota test app (tests/support/quota.py) with its Redis on the private server."""
    from fastapi_cache import FastAPICache
    from fastapi_cache.backends.redis import RedisBackend

    from atrium.app import create_app
    from atrium.config import load_settings
    from tests.conftest import drain_background_writes
    from tests.support.quota import quota_test_router

    other = create_app(load_settings(**{**settings.model_dump(), "redis_url": private_redis.url}))
    other.include_router(quota_test_router(), prefix="/v1")
    try:
        async with LifespanManager(other, startup_timeout=60):
            yield other
            await drain_background_writes(other)
    finally:
        FastAPICache.reset()
        FastAPICache.init(RedisBackend(app.state.redis_bytes), prefix="atrium-cache")


async def _mysql_used(app: Any, tenant_id: Any, metric: str) -> int:
    from sqlalchemy import func, select

    from atrium.models.billing import UsageCounter

    async with app.state.sessionmaker() as session:
        used = await session.scalar(
            select(func.coalesce(func.sum(UsageCounter.used), 0)).where(
                UsageCounter.tenant_id == tenant_id, UsageCounter.metric == metric
            )
        )
    return int(used or 0)


async def test_quota_counters_are_rebuilt_exactly_after_redis_lost_everything(
    quota_redis_app: Any, private_redis: Broker
) -> None:
    """Redis restarts empty (no persistence) while work is counted: a search settled before
    and waiting in the batch, a search holding its reservation through the outage. Nothing
    is counted twice or lost: the usage is the same before and after, MySQL agrees, and the
    limit admits exactly what is left."""
    from atrium.billing.quota import Metric, Quota
    from tests.support.quota import set_plan, superuser_headers, tenant_with_owner, usage_of

    app = quota_redis_app
    tenant, _, headers = await tenant_with_owner(app)
    transport = httpx.ASGITransport(
        app=app, client=("127.0.0.1", 50010), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", timeout=30
    ) as client:
        admin = await superuser_headers(app)
        overrides = {"requests_per_minute_per_user": None, "searches_per_month": 10}
        await set_plan(client, admin, tenant.id, "free", overrides)
        search = f"/v1/tenants/{tenant.id}/_quota_test/search"
        usage_url = f"/v1/tenants/{tenant.id}/usage"
        for _ in range(3):
            assert (await client.post(search, headers=headers)).status_code == 200
        quota = Quota.of(app)
        # Settled, waiting for the next batched write (as real searches are counted).
        for _ in range(2):
            settled = await quota.reserve(tenant.id, Metric.searches, 1).acquire()
            await settled.record_later()
        # Held, its work not finished yet.
        held = await quota.reserve(tenant.id, Metric.searches, 1).acquire()

        private_redis.stop()
        r = await client.post(search, headers=headers)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        private_redis.start()  # back, empty
        assert await app.state.redis.dbsize() == 0

        await held.commit()
        await quota.flush()  # a no-op if the batch timer wrote it during the outage
        r = await client.get(usage_url, headers=headers)
        assert r.status_code == 200, r.text
        assert usage_of(r.json(), "searches")["used"] == 6
        assert await _mysql_used(app, tenant.id, "searches") == 6
        for _ in range(4):
            assert (await client.post(search, headers=headers)).status_code == 200
        r = await client.post(search, headers=headers)
        assert r.status_code == 402, r.text
        await quota.flush()
        assert await _mysql_used(app, tenant.id, "searches") == 10
        r = await client.get(usage_url, headers=headers)
        assert usage_of(r.json(), "searches")["used"] == 10


def test_outages_are_recognised_through_their_causes() -> None:
    import redis.exceptions
    from sqlalchemy.exc import OperationalError

    outer = RuntimeError("wrapped")
    outer.__cause__ = redis.exceptions.ConnectionError("Connection refused")
    assert outage_of(outer) == "Redis"
    locked = OperationalError("BEGIN IMMEDIATE", None, Exception("database is locked"))
    assert outage_of(locked) == "the account database"
    assert outage_of(ValueError("a bug")) is None
