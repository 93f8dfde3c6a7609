"""The quota engine: reserve before the work, settle after it, exactly, across every replica.

How a unit of work is counted::

    async with ctx.reserve(tenant_id, Metric.documents, n) as r:
        stored = await store(...)         # raises -> the reservation is given back
        r.settle(stored)                  # optional: the actual amount (default: reserved)

1. **Reserve** (one Redis Lua script, atomic, ``lua/reserve.lua``): admitted only if
   ``used + reserved + amount <= limit`` for every metric held at once; the reservation is a
   member of a per-metric sorted set scored by its expiry, so a crashed worker's reservation
   lapses on its own instead of leaking capacity forever.
2. **Settle** (``batching.py``): MySQL first (``usage_counters``: ``used += actual,
   version += 1`` and the day's ``usage_daily`` figure, in one short transaction, now or with
   the next batch), then one Lua script removes the reservations and writes the committed
   figure into Redis only when its version is newer than the one Redis holds. MySQL is the
   source of truth; Redis is a cache of it plus the reservations in flight.
3. **Release** (the work failed before :meth:`Reservation.settle`): the reservation is removed.
4. **Rebuild**: when the Redis hash of a period is missing (flushed, evicted, expired), the
   first reserve reloads the figures from MySQL (version-checked, so a settle racing with the
   reload cannot be lost or counted twice).

Metrics are of two kinds: *levels* (members, collections, documents, stored bytes, chunks) that
go up and down and never reset, and *monthly* totals (searches, answers, LLM and embedding
tokens) that reset at the start of each billing period.

The modules: ``metrics`` (what is metered, :class:`QuotaExceeded`), ``periods`` (period
arithmetic), ``snapshot`` (a tenant's plan and period, its caches, Redis key names),
``scripts`` and ``lua/`` (the Redis scripts), ``repository`` (all SQL), ``engine``
(:class:`Quota`), ``reservation``, ``reserving`` (the reserve path), ``batching`` (the settle
path), ``alerts`` (usage warnings) and ``context`` (metering inside a unit of work, as
:class:`atrium.context.ServiceContext` does). Import from this package.
"""

from atrium.billing.quota.alerts import ALERT_THRESHOLDS, send_usage_warning
from atrium.billing.quota.batching import BATCH_FLUSH_SECONDS, BATCH_MAX
from atrium.billing.quota.context import adjust, reserve
from atrium.billing.quota.engine import DEFAULT_RESERVATION_TTL, Quota, close_quota, open_quota
from atrium.billing.quota.metrics import LEVEL_METRICS, METRIC_LIMITS, Metric, QuotaExceeded
from atrium.billing.quota.periods import Period, add_months, period_containing, period_tag
from atrium.billing.quota.repository import (
    accounts_due,
    add_to_counter,
    ensure_account,
    limits_in_session,
    load_billing,
    roll_period,
    tenants_without_account,
)
from atrium.billing.quota.reservation import Reservation
from atrium.billing.quota.snapshot import (
    BILLING_CACHE_SECONDS,
    MetricUsage,
    TenantBilling,
    alerts_key,
    billing_cache_key,
    reservations_key,
    usage_key,
)

__all__ = [
    "ALERT_THRESHOLDS",
    "BATCH_FLUSH_SECONDS",
    "BATCH_MAX",
    "BILLING_CACHE_SECONDS",
    "DEFAULT_RESERVATION_TTL",
    "LEVEL_METRICS",
    "METRIC_LIMITS",
    "Metric",
    "MetricUsage",
    "Period",
    "Quota",
    "QuotaExceeded",
    "Reservation",
    "TenantBilling",
    "accounts_due",
    "add_months",
    "add_to_counter",
    "adjust",
    "alerts_key",
    "billing_cache_key",
    "close_quota",
    "ensure_account",
    "limits_in_session",
    "load_billing",
    "open_quota",
    "period_containing",
    "period_tag",
    "reservations_key",
    "reserve",
    "roll_period",
    "send_usage_warning",
    "tenants_without_account",
    "usage_key",
]
