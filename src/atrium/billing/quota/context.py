"""Metering inside a unit of work: reserve and adjust with the SQLite deferral.

On SQLite (the embedded default) a quota write through the engine's own connection would wait
for a lock the caller's unit of work holds: SQLite has one write lock per database file, and a
transaction keeps it from its first write until it commits. So, on SQLite only, what is settled
or adjusted on behalf of an open unit of work is recorded right *after* its commit (an
:func:`atrium.kit.db.after_commit` hook), and given back if it rolls back; the reservation keeps
the capacity held until then, so limits stay exact. See docs/decisions/0005.

Services get these through :class:`atrium.context.ServiceContext`, which passes its session;
worker tasks, which meter outside their unit of work, call the engine directly.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.quota.engine import DEFAULT_RESERVATION_TTL, Quota
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.reservation import Reservation
from atrium.kit.db import after_commit


def reserve(
    quota: Quota,
    tenant_id: uuid.UUID,
    metric: Metric,
    amount: int,
    *,
    session: AsyncSession | None = None,
    ttl_seconds: int = DEFAULT_RESERVATION_TTL,
) -> Reservation:
    """``async with reserve(quota, tenant_id, Metric.documents, n, session=s) as r: ...`` —
    see :meth:`Quota.reserve`.

    Args:
        quota: the engine.
        tenant_id: whose quota.
        metric: what is used.
        amount: how much to hold (settle the actual amount with ``r.settle(n)``).
        session: the unit of work the work is part of (its commit records the settlement
            on SQLite).
        ttl_seconds: how long the hold lasts if the holder dies without settling.
    """
    return quota.reserve(
        tenant_id, metric, amount, ttl_seconds=ttl_seconds, defer_to=sqlite_unit_of_work(session)
    )


async def adjust(
    quota: Quota,
    tenant_id: uuid.UUID,
    metric: Metric,
    delta: int,
    *,
    session: AsyncSession | None = None,
) -> None:
    """Change a level without a limit check (``-1`` document when one is deleted...).

    ``session`` as for :func:`reserve`: on SQLite the change is recorded once it commits, and
    not at all if it rolls back.
    """
    if not delta:
        return
    deferred = sqlite_unit_of_work(session)
    if deferred is not None:

        async def when_done(committed: bool) -> None:
            if committed:  # rolled back: the change never happened, nothing to record
                await quota.adjust(tenant_id, metric, delta)

        if after_commit(deferred, when_done):
            return
    await quota.adjust(tenant_id, metric, delta)


def sqlite_unit_of_work(session: AsyncSession | None) -> AsyncSession | None:
    """``session`` when the account database is SQLite, else ``None``.

    SQLite has a single write lock, held by a transaction from its first write to its commit:
    a quota write through another connection meanwhile waits for a lock that is only freed
    after it returns (a self-deadlock that ends in "database is locked"). Deferring the write
    to after the commit is the simplest fix that keeps reserve-before-work exact (the hold
    stays in Redis until then) and leaves MySQL/MariaDB, which locks rows, as it was.
    """
    if session is None or session.bind is None:
        return None
    return session if session.bind.dialect.name == "sqlite" else None
