"""/healthz and /readyz against the real services."""

from __future__ import annotations

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


async def test_readyz_all_ok_with_a_worker(client: httpx.AsyncClient, celery_worker: Any) -> None:
    r = await client.get("/readyz")
    body = r.json()
    assert r.status_code == 200, body
    assert body["down"] == []
    for name in ("database", "vector_database", "redis", "worker"):
        assert body["components"][name]["status"] == "ok"
        assert body["components"][name]["latency_ms"] >= 0
    assert body["components"]["database"]["detail"] == "mysql"
    assert body["components"]["vector_database"]["detail"].startswith("pgvector 0.8")


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
    bad = load_settings(**{**settings.model_dump(), **override})
    app = create_app(bad)
    async with LifespanManager(app, startup_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/readyz")
    body = r.json()
    assert r.status_code == 503
    assert component in body["down"]
    assert body["components"][component]["status"] == "down"
    assert body["components"][component]["detail"]
