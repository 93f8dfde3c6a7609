"""The FastAPI application factory."""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_cache import FastAPICache
from fastapi_cache.backends.redis import RedisBackend

from atrium.auth.tokens import configure_jwt
from atrium.billing.plans import get_catalog, largest_upload
from atrium.billing.quota import close_quota, open_quota
from atrium.config import Settings, get_settings
from atrium.console import install as install_console
from atrium.health.endpoints import router as health_router
from atrium.ingestion.limits import human_bytes, max_request_bytes, upload_too_large_message
from atrium.kit.bodylimit import BodyLimitMiddleware, BodyLimitRule
from atrium.kit.db import create_engine, create_sessionmaker
from atrium.kit.errors import install_error_handlers
from atrium.kit.logging import RequestContextMiddleware, configure_logging
from atrium.kit.metrics import install_metrics
from atrium.kit.redis import create_redis
from atrium.kit.responses import ANY_ROUTE
from atrium.kit.vectordb import create_pool
from atrium.mcp_server import install as install_mcp
from atrium.mcp_server import running as mcp_running
from atrium.retrieval.cache import PendingWrites

log = structlog.get_logger("atrium.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: middleware, routers, error handlers and lifespan-managed pools."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    configure_jwt(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.vector_database_url or not settings.redis_url:
            raise RuntimeError(
                "ATRIUM_VECTOR_DATABASE_URL and ATRIUM_REDIS_URL are unset: start Atrium with "
                "`atrium dev` (or ./scripts/run), which starts the embedded servers, or set them."
            )
        engine = create_engine(settings.resolved_database_url, settings.database_pool_size)
        pool = create_pool(
            settings.vector_conninfo,
            settings.vector_pool_size,
            timeout=settings.vector_pool_timeout_seconds,
        )
        await pool.open(wait=False)
        redis = create_redis(settings.redis_url)
        redis_bytes = create_redis(settings.redis_url, decode_responses=False)
        app.state.settings = settings
        app.state.engine = engine
        app.state.sessionmaker = create_sessionmaker(engine)
        app.state.vector_pool = pool
        app.state.redis = redis
        app.state.redis_bytes = redis_bytes
        # The quota engine, on its own small pool; routes and services reach it as Quota.of.
        open_quota(app)
        FastAPICache.reset()  # a class-level singleton: point it at this app's Redis
        FastAPICache.init(RedisBackend(redis_bytes), prefix="atrium-cache")
        # Search results queued for the cache, carried by later searches' round trips.
        app.state.search_cache_writes = PendingWrites(redis_bytes)
        log.info("startup", environment=settings.environment.value)
        try:
            # The MCP endpoint's session manager; stopped before the pools its tools use.
            async with mcp_running(app):
                yield
        finally:
            # Queued usage settlements first: they need the quota pool and Redis.
            await close_quota(app)
            await app.state.search_cache_writes.close()
            await pool.close()
            await redis.aclose()
            await redis_bytes.aclose()
            await engine.dispose()

    app = FastAPI(
        title="Atrium",
        version="0.1.0",
        summary="Multi-tenant retrieval-augmented generation backend",
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.state.settings = settings
    install_error_handlers(app)
    install_metrics(app, settings)
    _install_body_limits(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=True,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
        )
    app.add_middleware(RequestContextMiddleware, hsts=settings.is_production)

    app.include_router(health_router)
    for router in _v1_routers():
        # What every route may answer besides its own statuses (kit/responses.py).
        app.include_router(router, prefix="/v1", responses=ANY_ROUTE)
    install_console(app)  # the web console at / (not under /v1)
    install_mcp(app)  # the MCP server at /mcp (API keys)
    return app


def _install_body_limits(app: FastAPI, settings: Settings) -> None:
    """Every route's request body is limited as it streams (inside CORS and the request id, so
    a 413 carries their headers): uploads to the largest request any plan allows (the route
    then applies the tenant's own plan), everything else to ``max_request_body_bytes``."""
    # The largest plan's document size bounds every tenant's upload request (overrides above
    # it are refused, billing.service.change_plan).
    largest = largest_upload(get_catalog())
    upload = BodyLimitRule(
        method="POST",
        path=re.compile(r"/v1/tenants/[^/]+/collections/[^/]+/documents/?"),
        limit=max_request_bytes(largest, multipart=True),
        message=upload_too_large_message(largest, multipart=True),
    )
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_request_body_bytes,
        default_message=(
            f"The request body is larger than {human_bytes(settings.max_request_body_bytes)}, "
            "the most this route accepts: send less data per request (documents go to "
            "POST /v1/tenants/{tenant_id}/collections/{collection_id}/documents)"
        ),
        rules=[upload],
    )


def _v1_routers() -> list[APIRouter]:
    """Each domain's router; imported here so the app module stays import-cheap."""
    routers: list[APIRouter] = []
    for module in V1_ROUTER_MODULES:
        routers.append(importlib.import_module(module).router)
    return routers


#: Domain routers mounted under /v1, in order. A request is matched against the routes in
#: this order, one path pattern after another: the hot path (search, answer) comes first, so
#: it does not test the other ~90 patterns on every query (~5% of a search's CPU). No path
#: of these two overlaps another router's.
V1_ROUTER_MODULES: list[str] = [
    "atrium.retrieval.endpoints",
    "atrium.llm.endpoints",
    "atrium.accounts.endpoints",
    "atrium.tenants.endpoints",
    "atrium.admin.endpoints",
    "atrium.apikeys.endpoints",
    "atrium.collections.endpoints",
    "atrium.ingestion.endpoints",
    "atrium.billing.endpoints",
]
