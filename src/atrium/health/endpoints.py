"""Liveness and readiness.

``/readyz`` is unauthenticated (load balancers and monitors call it), so it must be cheap and
must not describe the backends to strangers:

* the answer is computed at most once per ``ATRIUM_READYZ_CACHE_SECONDS`` per process (callers
  meanwhile get the last one; concurrent callers share one check), so a flood of probes costs
  the databases nothing;
* the Celery worker check is a broadcast ping that every worker answers: after a successful
  one it runs at most once per ``ATRIUM_READYZ_WORKER_CHECK_SECONDS`` per process;
* anyone sees the overall status and which components are down; the error text and latency of
  each check only go to a caller with ``Authorization: Bearer <ATRIUM_METRICS_TOKEN>`` (the
  token of ``/metrics``; without a configured token nobody gets them). Failures are logged
  with their error either way.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from atrium.config import Settings
from atrium.kit.celery_app import get_celery

router = APIRouter(tags=["health"])
log = structlog.get_logger("atrium.health")

CHECK_TIMEOUT = 3.0
COMPONENTS = ("database", "vector_database", "redis", "worker")


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


@dataclass
class _Readiness:
    """One process's cached readiness answer and worker ping (kept on ``app.state``)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    components: dict[str, dict[str, Any]] | None = None
    checked_at: float = 0.0
    worker: dict[str, Any] | None = None
    worker_checked_at: float = 0.0


def _readiness(request: Request) -> _Readiness:
    state = request.app.state
    cached: _Readiness | None = getattr(state, "readiness", None)
    if cached is None:
        cached = state.readiness = _Readiness()
    return cached


def _authorised(request: Request, settings: Settings) -> bool:
    token = settings.metrics_token.get_secret_value()
    if not token:
        return False
    sent = request.headers.get("authorization", "")
    return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())


async def _check(request: Request, cache: _Readiness) -> dict[str, dict[str, Any]]:
    state = request.app.state
    settings: Settings = state.settings

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
        replies = await run_in_threadpool(get_celery().control.ping, timeout=1.0)
        if not replies:
            raise RuntimeError("no Celery worker answered a ping")
        return f"{len(replies)} worker(s)"

    async def worker_cached() -> dict[str, Any]:
        # A broadcast that every worker answers: not something each probe may trigger. A
        # failed ping is retried as soon as the answer itself expires (workers starting up
        # should not read as down for long).
        ttl = settings.readyz_worker_check_seconds
        if cache.worker is not None and cache.worker["status"] != "ok":
            ttl = min(ttl, settings.readyz_cache_seconds)
        if cache.worker is not None and time.monotonic() - cache.worker_checked_at < ttl:
            return cache.worker
        cache.worker = await _timed(worker)
        cache.worker_checked_at = time.monotonic()
        return cache.worker

    results = await asyncio.gather(_timed(database), _timed(vector), _timed(redis), worker_cached())
    return dict(zip(COMPONENTS, results, strict=True))


@router.get(
    "/readyz",
    summary="Every dependency answers",
    responses={503: {"description": "A component is down; the body names it"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Check the account database, PostgreSQL + pgvector, Redis and a Celery worker.

    Answers 200, or 503 naming what is down. The answer may be a few seconds old
    (``ATRIUM_READYZ_CACHE_SECONDS``). Each component's error text and latency are included
    only for ``Authorization: Bearer <ATRIUM_METRICS_TOKEN>``.
    """
    settings: Settings = request.app.state.settings
    cache = _readiness(request)
    async with cache.lock:
        age = time.monotonic() - cache.checked_at
        if cache.components is None or age >= settings.readyz_cache_seconds:
            cache.components = await _check(request, cache)
            cache.checked_at = time.monotonic()
            for name, result in cache.components.items():
                if result["status"] != "ok":
                    log.warning("readiness_check_failed", component=name, error=result["detail"])
        components = cache.components
    down = [n for n, r in components.items() if r["status"] != "ok"]
    if _authorised(request, settings):
        shown = components
    else:
        shown = {n: {"status": r["status"]} for n, r in components.items()}
    body = {"status": "ok" if not down else "unavailable", "down": down, "components": shown}
    return JSONResponse(body, status_code=503 if down else 200)
