"""/healthz and /readyz against the real services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from atrium.app import create_app
from atrium.config import load_settings


async def test_healthz(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


TOKEN = "readyz-test-metrics-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def _app_client(settings: Any, **override: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a fresh app (its own readiness cache) with these settings changed."""
    app = create_app(load_settings(**{**settings.model_dump(), **override}))
    async with LifespanManager(app, startup_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


async def test_readyz_all_ok_with_a_worker(settings: Any, celery_worker: Any) -> None:
    async with _app_client(settings, metrics_token=TOKEN) as c:
        r = await c.get("/readyz", headers=AUTH)
        body = r.json()
        assert r.status_code == 200, body
        assert body["down"] == []
        for name in ("database", "vector_database", "redis", "worker"):
            assert body["components"][name]["status"] == "ok"
            assert body["components"][name]["latency_ms"] >= 0
        assert body["components"]["database"]["detail"] == "mysql"
        assert body["components"]["vector_database"]["detail"].startswith("pgvector 0.8")

        # Without the token (or with another one): the status of each component, nothing more.
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await c.get("/readyz", headers=headers)
            assert r.status_code == 200
            assert r.json() == {
                "status": "ok",
                "down": [],
                "components": {n: {"status": "ok"} for n in body["components"]},
            }


@pytest.mark.parametrize(
    ("override", "component"),
    [
        ({"redis_url": "redis://127.0.0.1:1/0"}, "redis"),
        ({"vector_database_url": "postgresql+psycopg://u@127.0.0.1:1/none"}, "vector_database"),
        ({"database_url": "mysql+aiomysql://root@127.0.0.1:1/none"}, "database"),
    ],
)
async def test_readyz_names_the_component_that_is_down(
    settings: Any, override: dict[str, str], component: str
) -> None:
    async with _app_client(settings, metrics_token=TOKEN, **override) as c:
        public = await c.get("/readyz")
        private = await c.get("/readyz", headers=AUTH)
    body = public.json()
    assert public.status_code == 503
    assert component in body["down"]
    # Strangers learn what is down, not why: no exception text, addresses or latencies.
    assert body["components"][component] == {"status": "down"}
    assert all(set(c) == {"status"} for c in body["components"].values()), body
    assert "127.0.0.1" not in public.text and "Error" not in public.text
    # The metrics token's bearer gets the error.
    assert private.status_code == 503
    detail = private.json()["components"][component]
    assert detail["status"] == "down" and detail["detail"] and detail["latency_ms"] >= 0


def _count_pings(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record every Celery broadcast ping (the real one still goes out)."""
    from atrium.worker import celery_app

    pings: list[float] = []
    real_ping = celery_app.control.ping

    def ping(*args: Any, **kwargs: Any) -> Any:
        pings.append(time.monotonic())
        return real_ping(*args, **kwargs)

    monkeypatch.setattr(celery_app.control, "ping", ping)
    return pings


async def test_readyz_answers_from_its_cache(
    settings: Any, celery_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _count_pings(monkeypatch)
    async with _app_client(
        settings, readyz_cache_seconds=600, readyz_worker_check_seconds=600
    ) as c:
        first = await c.get("/readyz")
        assert first.status_code == 200, first.text
        # A flood of probes, some at once: one check, one ping, the same answer.
        rs = [await c.get("/readyz") for _ in range(10)]
        rs += await asyncio.gather(*(c.get("/readyz") for _ in range(10)))
    assert {r.status_code for r in rs} == {200}
    assert {r.text for r in rs} == {first.text}
    assert len(pings) == 1


async def test_readyz_pings_workers_rarely_even_uncached(
    settings: Any, celery_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings = _count_pings(monkeypatch)
    async with _app_client(settings, readyz_cache_seconds=0, readyz_worker_check_seconds=600) as c:
        for _ in range(5):
            r = await c.get("/readyz")
            assert r.status_code == 200, r.text
    # Every call checked the databases, but the workers were pinged once.
    assert len(pings) == 1
