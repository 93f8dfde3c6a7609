"""Billing tasks: the periodic rollover of billing periods (Celery beat, every minute)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import structlog

from atrium.billing.quota import (
    Metric,
    Quota,
    accounts_due,
    alerts_key,
    ensure_account,
    period_tag,
    reservations_key,
    roll_period,
    tenants_without_account,
    usage_key,
)
from atrium.kit import runtime
from atrium.kit.db import unit_of_work
from atrium.models import utcnow
from atrium.tenants.repository import MembershipRepository
from atrium.worker import celery_app

log = structlog.get_logger("atrium.billing.tasks")

ROLL_TASK = "atrium.billing.roll_periods"
#: How often beat runs the rollover: a period starts at most this late.
ROLL_INTERVAL_SECONDS = 60.0
_BATCH = 500


async def roll_periods(now: dt.datetime | None = None) -> dict[str, Any]:
    """Start the new period of every tenant whose period ended, and open billing accounts for
    tenants that have none yet. Idempotent (each move is conditional on the period it read).

    Returns:
        ``{"rolled": [tenant ids], "opened": n}``.
    """
    res = await runtime.resources()
    quota = Quota.for_resources(res)
    now = now or utcnow()
    rolled: list[tuple[str, dt.datetime]] = []
    opened = 0
    async with unit_of_work(res.sessionmaker) as session:
        missing = await tenants_without_account(session, _BATCH)
        for missing_id in missing:
            await ensure_account(session, missing_id, now)
            opened += 1
    while True:
        async with unit_of_work(res.sessionmaker) as session:
            due = await accounts_due(session, now, _BATCH)
            batch: list[tuple[str, dt.datetime]] = []
            seats: dict[str, int] = {}
            for account in due:
                old_start = account.period_start
                if await roll_period(session, account, now):
                    batch.append((str(account.tenant_id), old_start))
                    seats[str(account.tenant_id)] = await MembershipRepository(
                        session, account.tenant_id
                    ).count()
        # After commit: drop cached snapshots and the finished period's Redis state.
        for tenant_id, old_start in batch:
            old = period_tag(old_start)
            keys = [usage_key(tenant_id, old), alerts_key(tenant_id, old)]
            keys += [reservations_key(tenant_id, old, m) for m in Metric if not m.is_level]
            await res.redis.delete(*keys)
            await quota.forget_billing(tenant_id)
            # Once a period, the members level is recounted from the memberships themselves
            # (a commit that failed after its seat was counted, an account deleted...).
            await quota.set_level(uuid.UUID(tenant_id), Metric.members, seats[tenant_id])
        rolled.extend(batch)
        if len(due) < _BATCH:
            break
    if rolled or opened:
        log.info("billing_periods_rolled", rolled=len(rolled), opened=opened)
    return {"rolled": [t for t, _ in rolled], "opened": opened}


@celery_app.task(name=ROLL_TASK)
def roll_periods_task() -> dict[str, Any]:
    """Beat entry: roll over the billing periods that ended (see :func:`roll_periods`)."""
    return runtime.run(roll_periods())


#: Registered in ``atrium.worker`` (``beat_schedule``).
BEAT_SCHEDULE = {
    "billing-roll-periods": {"task": ROLL_TASK, "schedule": ROLL_INTERVAL_SECONDS},
}
