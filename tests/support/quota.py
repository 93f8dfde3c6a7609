"""Shared helpers for the quota, usage and plan tests: a test app with quota'd routes, a real
HTTP server for it, and superuser shortcuts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Depends

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Metric
from atrium.context import Ctx
from atrium.kit.errors import BadGateway
from tests.support.factories import bearer, create_tenant, create_user


def quota_test_router() -> APIRouter:
    """Tenant routes that meter work the way the real domains do."""
    router = APIRouter(prefix="/tenants/{tenant_id}/_quota_test")

    @router.post("/search")
    async def search(
        tenant_id: uuid.UUID,
        ctx: Ctx,
        fail: bool = False,
        delay: float = 0.02,
        subject: AuthSubject = Depends(require(Permission.search)),
    ) -> dict[str, bool]:
        async with ctx.reserve(subject.tenant_id, Metric.searches, 1):
            await asyncio.sleep(delay)
            if fail:
                raise BadGateway("the upstream failed")
        return {"ok": True}

    @router.post("/tokens")
    async def tokens(
        tenant_id: uuid.UUID,
        ctx: Ctx,
        reserve_n: int,
        actual: int,
        fail: str = "",
        subject: AuthSubject = Depends(require(Permission.answer)),
    ) -> dict[str, bool]:
        async with ctx.reserve(subject.tenant_id, Metric.llm_tokens, reserve_n) as r:
            if fail == "before":
                raise BadGateway("the model failed before answering")
            r.settle(actual)
            if fail == "after":
                raise BadGateway("the stream broke after the answer was produced")
        return {"ok": True}

    @router.post("/documents")
    async def add_document(
        tenant_id: uuid.UUID,
        ctx: Ctx,
        size: int = 100,
        subject: AuthSubject = Depends(require(Permission.documents_write)),
    ) -> dict[str, bool]:
        async with (
            ctx.reserve(subject.tenant_id, Metric.documents, 1),
            ctx.reserve(subject.tenant_id, Metric.stored_bytes, size),
        ):
            pass
        return {"ok": True}

    @router.delete("/documents")
    async def delete_document(
        tenant_id: uuid.UUID,
        ctx: Ctx,
        size: int = 100,
        subject: AuthSubject = Depends(require(Permission.documents_write)),
    ) -> dict[str, bool]:
        await ctx.adjust(subject.tenant_id, Metric.documents, -1)
        await ctx.adjust(subject.tenant_id, Metric.stored_bytes, -size)
        return {"ok": True}

    return router


def build_quota_app() -> Any:
    """A fresh app from ``create_app`` with the quota test routes mounted under /v1."""
    from atrium.app import create_app

    app = create_app()
    app.include_router(quota_test_router(), prefix="/v1")
    return app


@contextlib.asynccontextmanager
async def serve_http(app: Any) -> AsyncIterator[str]:
    """Serve an already started app with uvicorn on a free loopback port (real TCP)."""
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", backlog=256
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def superuser_headers(app: Any) -> dict[str, str]:
    """A fresh superuser's Authorization header."""
    return await bearer(await create_user(app, superuser=True))


async def set_plan(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    tenant_id: uuid.UUID,
    plan: str = "free",
    overrides: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """PUT the tenant's plan as a superuser; returns the response body."""
    body: dict[str, Any] = {"plan": plan}
    if overrides is not None:
        body["overrides"] = overrides
    r = await client.put(f"/v1/admin/tenants/{tenant_id}/plan", json=body, headers=admin)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def tenant_with_owner(app: Any) -> tuple[Any, Any, dict[str, str]]:
    """A tenant, its owner and the owner's Authorization header."""
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    return tenant, owner, await bearer(owner)


def usage_of(body: dict[str, Any], metric: str) -> dict[str, Any]:
    """One metric's entry of a GET usage body."""
    return next(m for m in body["metrics"] if m["metric"] == metric)
