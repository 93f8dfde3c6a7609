"""What a service call works with, passed explicitly: never ``fastapi.Request``.

A service needs the unit of work it writes in, Redis (caches, versions, limits), the quota
engine, the settings, and, for the audit trail, where the call came from. Routes get all of it
from one dependency, :data:`Ctx`; code outside a request (a task, a script, a test) builds a
:class:`ServiceContext` from the connections it owns. There is no "no context" mode: a service
always meters, invalidates caches and audits (calls without a request used to skip them).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from atrium.audit.service import Origin
from atrium.billing.quota import DEFAULT_RESERVATION_TTL, Metric, Quota, Reservation
from atrium.billing.quota import adjust as adjust_level
from atrium.billing.quota import reserve as reserve_quota
from atrium.config import Settings
from atrium.kit.db import DBSession, unit_of_work
from atrium.kit.ratelimit import STATE_KEY as RATE_LIMIT_STATES
from atrium.kit.ratelimit import RateLimitState


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """The unit of work, connections and origin of one service call.

    Attributes:
        session: the unit of work; services flush, its owner commits.
        sessionmaker: for a write that must outlive ``session`` (:meth:`detached`).
        redis: the app's (or the worker's) Redis client, strings decoded.
        quota: the quota engine.
        settings: the settings.
        origin: where the call came from, for the audit trail.
        rate_limits: the states of the limits a service counted the call against; a request
            reports the tightest in its ``X-RateLimit-*`` headers.
    """

    session: AsyncSession
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis
    quota: Quota
    settings: Settings
    origin: Origin = field(default_factory=Origin)
    rate_limits: list[RateLimitState] = field(default_factory=list)

    def reserve(
        self,
        tenant_id: uuid.UUID,
        metric: Metric,
        amount: int,
        *,
        ttl_seconds: int = DEFAULT_RESERVATION_TTL,
    ) -> Reservation:
        """Hold ``amount`` of ``metric`` for work in this unit of work (``async with``)."""
        return reserve_quota(
            self.quota, tenant_id, metric, amount, session=self.session, ttl_seconds=ttl_seconds
        )

    async def adjust(self, tenant_id: uuid.UUID, metric: Metric, delta: int) -> None:
        """Change a level (``-1`` document...) once this unit of work commits."""
        await adjust_level(self.quota, tenant_id, metric, delta, session=self.session)

    @contextlib.asynccontextmanager
    async def detached(self) -> AsyncIterator[AsyncSession]:
        """A unit of work of its own, committed on exit, for a write that must survive this
        call failing (the audit record of a refused login, a replayed token's revocation).

        This call's unit of work is rolled back first: the call is about to fail anyway, and on
        SQLite its transaction may hold the database's only write lock, which the detached
        transaction would otherwise wait for in vain.
        """
        await self.session.rollback()
        async with unit_of_work(self.sessionmaker) as session:
            yield session


async def service_context(request: Request, session: DBSession) -> ServiceContext:
    """Request dependency: the request's unit of work, the app's connections, its origin."""
    state = request.app.state
    return ServiceContext(
        session=session,
        sessionmaker=state.sessionmaker,
        redis=state.redis,
        quota=Quota.of(request),
        settings=state.settings,
        origin=Origin.of(request),
        # The very list the response's X-RateLimit-* headers come from (kit.ratelimit).
        rate_limits=request.scope.setdefault("state", {}).setdefault(RATE_LIMIT_STATES, []),
    )


#: Use this in endpoints: ``ctx: Ctx``.
Ctx = Annotated[ServiceContext, Depends(service_context)]
