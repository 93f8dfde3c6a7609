"""Metering from wherever work is done: a request, a worker task, or an engine at hand.

On SQLite (the embedded default) a quota write through the engine's own connection would wait
for a lock the request holds: SQLite has one write lock per database file, and the request's
unit of work keeps it from its first write until it commits. So, on SQLite only, what a
request settles or adjusts through :func:`reserve` and :func:`adjust` is recorded right
*after* the request's commit (an :func:`atrium.kit.db.after_commit` hook), and given back if
it rolls back; the reservation keeps the capacity held until then, so limits stay exact.
See docs/decisions/0005.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from atrium.billing.quota.engine import DEFAULT_RESERVATION_TTL, Quota
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.reservation import Reservation, Unmetered
from atrium.kit.db import after_commit
from atrium.kit.runtime import Resources

#: Where work is metered from: a request (its app's engine, its unit of work), an app, a worker
#: task's resources, or an engine. ``None`` (a service called without a request) meters
#: nothing.
MeterContext = HTTPConnection | Starlette | Resources | Quota | None


def engine_of(ctx: HTTPConnection | Starlette | Resources | Quota) -> Quota:
    """The quota engine ``ctx`` meters through."""
    if isinstance(ctx, Quota):
        return ctx
    if isinstance(ctx, Resources):
        return Quota.for_resources(ctx)
    return Quota.of(ctx)


def reserve(
    ctx: MeterContext,
    tenant_id: uuid.UUID,
    metric: Metric,
    amount: int,
    *,
    ttl_seconds: int = DEFAULT_RESERVATION_TTL,
) -> Reservation | Unmetered:
    """``async with reserve(request, tenant_id, Metric.searches, 1) as r: ...`` — see
    :meth:`Quota.reserve`.

    Args:
        ctx: a request, a task's resources, or an engine; ``None`` meters nothing.
        tenant_id: whose quota.
        metric: what is used.
        amount: how much to hold (settle the actual amount with ``r.settle(n)``).
        ttl_seconds: how long the hold lasts if the holder dies without settling.
    """
    if ctx is None:
        return Unmetered()
    return engine_of(ctx).reserve(
        tenant_id, metric, amount, ttl_seconds=ttl_seconds, defer_to=sqlite_unit_of_work(ctx)
    )


async def adjust(ctx: MeterContext, tenant_id: uuid.UUID, metric: Metric, delta: int) -> None:
    """Change a level without a limit check (``-1`` document when one is deleted...).
    ``ctx`` as for :func:`reserve`; ``None`` meters nothing."""
    if ctx is None or not delta:
        return
    quota = engine_of(ctx)
    session = sqlite_unit_of_work(ctx)
    if session is not None:

        async def when_done(committed: bool) -> None:
            if committed:  # rolled back: the change never happened, nothing to record
                await quota.adjust(tenant_id, metric, delta)

        if after_commit(session, when_done):
            return
    await quota.adjust(tenant_id, metric, delta)


def sqlite_unit_of_work(
    ctx: HTTPConnection | Starlette | Resources | Quota,
) -> AsyncSession | None:
    """The request's open unit of work when the account database is SQLite, else ``None``.

    SQLite has a single write lock, held by the request's transaction from its first write to
    its commit: a quota write through another connection meanwhile waits for a lock that is
    only freed after it returns (a self-deadlock that ends in "database is locked"). Deferring
    the write to after the commit is the simplest fix that keeps reserve-before-work exact (the
    hold stays in Redis until then) and leaves MySQL/MariaDB, which locks rows, as it was.
    """
    if not isinstance(ctx, HTTPConnection):
        return None
    session = getattr(ctx.state, "db_session", None)
    if not isinstance(session, AsyncSession) or session.bind is None:
        return None
    return session if session.bind.dialect.name == "sqlite" else None
