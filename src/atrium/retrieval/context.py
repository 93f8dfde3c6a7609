"""What a search or an answer works with, passed explicitly: never ``fastapi.Request``.

Routes get a :class:`QueryContext` from :func:`atrium.retrieval.endpoints.query_context`, which
also resolves the caller; the MCP tools build one from their app. Unlike the account-side
:class:`atrium.context.ServiceContext` it holds no unit of work: a search reads the vector
store and Redis, and meters through the quota engine's batched writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.billing.quota import Quota
from atrium.config import Settings
from atrium.kit.ratelimit import Bucket, RateLimitState
from atrium.retrieval.cache import PendingWrites


@dataclass(frozen=True, slots=True)
class QueryContext:
    """The pools, settings and metering of one search or answer.

    Attributes:
        settings: the settings.
        vector_pool: the vector store's connection pool.
        redis: the app's Redis client (cache versions, result cache).
        engine: the account database (the tenant's collections).
        quota: the quota engine that holds and settles the query.
        cache_writes: the app's queued result-cache fills, carried by the next quota hold.
        rate_limit: the caller's per-minute bucket, counted in the same Redis script as the
            query's first quota hold; None when it was counted already (MCP counts it per
            message) or the plan sets no limit.
        rate_limits: the outcomes of the limits counted, for the ``X-RateLimit-*`` headers.
    """

    settings: Settings
    vector_pool: AsyncConnectionPool
    redis: Redis
    engine: AsyncEngine
    quota: Quota
    cache_writes: PendingWrites
    rate_limit: Bucket | None = None
    rate_limits: list[RateLimitState] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        app: Starlette,
        *,
        rate_limit: Bucket | None = None,
        rate_limits: list[RateLimitState] | None = None,
    ) -> QueryContext:
        """The running app's pools, settings and quota engine."""
        state = app.state
        return cls(
            settings=state.settings,
            vector_pool=state.vector_pool,
            redis=state.redis,
            engine=state.engine,
            quota=Quota.of(app),
            cache_writes=state.search_cache_writes,
            rate_limit=rate_limit,
            rate_limits=rate_limits if rate_limits is not None else [],
        )
