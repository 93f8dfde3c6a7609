"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

router = APIRouter(tags=["health"])

CHECK_TIMEOUT = 3.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    """Answers as long as the process serves requests; checks nothing else."""
    return {"status": "ok"}


async def _timed(check: Callable[[], Awaitable[str]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), CHECK_TIMEOUT)
        status = "ok"
    except TimeoutError:
        status, detail = "down", f"no answer within {CHECK_TIMEOUT:.0f} s"
    except Exception as exc:
        status, detail = "down", f"{type(exc).__name__}: {exc}"[:300]
    return {
        "status": status,
        "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        "detail": detail,
    }


@router.get(
    "/readyz",
    summary="Every dependency answers",
    responses={503: {"description": "A component is down; the body names it"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Check the account database, PostgreSQL + pgvector, Redis and a Celery worker.

    Answers 200 with each component's status and latency, or 503 naming what is down.
    """
    state = request.app.state

    async def database() -> str:
        async with state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return str(state.engine.dialect.name)

    async def vector() -> str:
        async with state.vector_pool.connection() as conn:
            cur = await conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = await cur.fetchone()
        if row is None:
            raise RuntimeError("the pgvector extension is not installed")
        return f"pgvector {row[0]}"

    async def redis() -> str:
        await state.redis.ping()
        return "PONG"

    async def worker() -> str:
        from atrium.worker import celery_app

        replies = await run_in_threadpool(celery_app.control.ping, timeout=1.0)
        if not replies:
            raise RuntimeError("no Celery worker answered a ping")
        return f"{len(replies)} worker(s)"

    names = ["database", "vector_database", "redis", "worker"]
    results = await asyncio.gather(*(_timed(c) for c in (database, vector, redis, worker)))
    components = dict(zip(names, results, strict=True))
    down = [n for n, r in components.items() if r["status"] != "ok"]
    body = {"status": "ok" if not down else "unavailable", "down": down, "components": components}
    return JSONResponse(body, status_code=503 if down else 200)
