"""Every error has one shape, and no stack trace reaches a client."""

from __future__ import annotations

import httpx
from asgi_lifespan import LifespanManager
from pydantic import BaseModel

from atrium.app import create_app


class Body(BaseModel):
    n: int


async def test_error_shapes_and_headers(settings: object) -> None:
    app = create_app(settings)  # type: ignore[arg-type]

    @app.post("/echo")
    async def echo(body: Body) -> Body:
        return body

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/nope")
            assert r.status_code == 404
            assert r.json() == {"error": "NotFound", "detail": "Not Found"}

            r = await c.post("/echo", json={"n": "x"})
            assert r.status_code == 422
            body = r.json()
            assert body["error"] == "ValidationError"
            assert body["detail"][0]["loc"] == ["body", "n"]

            r = await c.get("/boom", headers={"X-Request-ID": "req-123"})
            assert r.status_code == 500
            assert r.json()["error"] == "InternalError"
            assert "req-123" in r.json()["detail"]
            assert "secret internals" not in r.text and "Traceback" not in r.text

            r = await c.get("/healthz")
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
            assert len(r.headers["x-request-id"]) == 32
