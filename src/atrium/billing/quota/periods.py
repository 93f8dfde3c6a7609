"""Billing period arithmetic: monthly periods anchored at the tenant's creation, and which
period (and Redis tag) a metric's figure belongs to."""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

from atrium.billing.quota.metrics import Metric
from atrium.models.billing import LEVEL_PERIOD

#: The Redis tag of the period that levels live in (they never reset).
LEVEL_TAG = "level"


@dataclass(frozen=True)
class Period:
    """A billing period ``[start, end)``."""

    start: dt.datetime
    end: dt.datetime


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def add_months(anchor: dt.datetime, months: int) -> dt.datetime:
    """``anchor`` moved by ``months`` calendar months, the day clamped to the month's length
    (an account anchored on the 31st renews on the 30th, 28th or 29th in short months)."""
    years, month0 = divmod(anchor.month - 1 + months, 12)
    year, month = anchor.year + years, month0 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def period_containing(anchor: dt.datetime, now: dt.datetime) -> Period:
    """The monthly period anchored at ``anchor`` that contains ``now``."""
    n = (now.year - anchor.year) * 12 + (now.month - anchor.month)
    start = add_months(anchor, n)
    while start > now:
        n -= 1
        start = add_months(anchor, n)
    end = add_months(anchor, n + 1)
    while end <= now:
        n += 1
        start, end = end, add_months(anchor, n + 1)
    return Period(start=start, end=end)


def anchor_of(created_at: dt.datetime) -> dt.datetime:
    """The period anchor of an account created at ``created_at``."""
    # Whole seconds: MySQL DATETIME keeps no fraction, and the period key must round-trip.
    return created_at.astimezone(dt.UTC).replace(microsecond=0)


def period_tag(period_start: dt.datetime) -> str:
    """The Redis tag of the monthly period starting at ``period_start``."""
    return period_start.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S")


def period_of(period: Period, metric: Metric) -> tuple[str, dt.datetime]:
    """``(Redis tag, period_start)`` that ``metric``'s figure is counted under: the current
    monthly ``period`` for monthly totals, the everlasting level period for levels."""
    if metric.is_level:
        return LEVEL_TAG, LEVEL_PERIOD
    return period_tag(period.start), period.start


def hash_ttl_ms(period: Period, metric: Metric) -> int:
    """How long the Redis usage hash of ``metric``'s period is kept (it is rebuilt from MySQL
    when gone): a month for levels, the rest of the period plus a week for monthly totals."""
    if metric.is_level:
        return 30 * 86400 * 1000
    left = (period.end - utcnow()).total_seconds()
    return int((max(0.0, left) + 7 * 86400) * 1000)
