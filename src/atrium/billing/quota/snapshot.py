"""A tenant's billing snapshot (plan, overrides, current period), the per-engine caches of it,
and the names of the Redis keys the quota engine uses."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from dataclasses import dataclass

from atrium.billing.plans import Limit, PlanCatalog
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.periods import Period

#: How long a tenant's plan/period snapshot is cached in Redis.
BILLING_CACHE_SECONDS = 300
#: ... and in each engine: a plan change reaches other replicas within this many seconds
#: (the replica that made it forgets at once). Saves a Redis round trip on every request.
LOCAL_BILLING_CACHE_SECONDS = 5.0
#: Entries a cache keeps before it starts over (a bound, not a tuning knob).
LOCAL_BILLING_MAX = 10_000


@dataclass(frozen=True)
class TenantBilling:
    """A tenant's plan, overrides and current period (cached in Redis for a few minutes)."""

    tenant_id: uuid.UUID
    tenant_name: str
    plan: str
    overrides: dict[str, int | None]
    period: Period

    def limits(self, catalog: PlanCatalog) -> dict[Limit, int | None]:
        """Every limit: the plan's with this tenant's overrides applied."""
        return apply_overrides(dict(catalog.get(self.plan).limits), self.overrides)

    def limit(self, catalog: PlanCatalog, limit: Limit) -> int | None:
        """One limit (``None``: unlimited)."""
        return self.limits(catalog)[limit]

    def to_json(self) -> str:
        """Serialise for the Redis cache."""
        return json.dumps(
            {
                "tenant_id": str(self.tenant_id),
                "tenant_name": self.tenant_name,
                "plan": self.plan,
                "overrides": self.overrides,
                "start": self.period.start.isoformat(),
                "end": self.period.end.isoformat(),
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> TenantBilling:
        """Read back :meth:`to_json`."""
        data = json.loads(raw)
        return cls(
            tenant_id=uuid.UUID(data["tenant_id"]),
            tenant_name=data["tenant_name"],
            plan=data["plan"],
            overrides=data["overrides"],
            period=Period(
                dt.datetime.fromisoformat(data["start"]), dt.datetime.fromisoformat(data["end"])
            ),
        )


def apply_overrides(
    limits: dict[Limit, int | None], overrides: dict[str, int | None]
) -> dict[Limit, int | None]:
    """``limits`` with a tenant's overrides applied (unknown keys ignored); changes ``limits``."""
    for key, value in overrides.items():
        if key in Limit.__members__:
            limits[Limit(key)] = value
    return limits


@dataclass
class MetricUsage:
    """One metric's standing in the current period."""

    metric: Metric
    used: int
    reserved: int
    limit: int | None
    resets_at: dt.datetime | None

    @property
    def percent(self) -> float | None:
        """``used`` as a percentage of ``limit`` (None when unlimited)."""
        if self.limit is None:
            return None
        if self.limit == 0:
            return 100.0 if self.used else 0.0
        return round(self.used * 100 / self.limit, 2)


class SnapshotCache:
    """An engine's in-process copies of tenants' snapshots, in two kinds.

    *Recent* snapshots are trusted for :data:`LOCAL_BILLING_CACHE_SECONDS` (limits and figures
    read without a Redis round trip). *Verified* ones are kept with the SHA-1 of the JSON they
    were read from; the reservation script compares it with the JSON in Redis, so a plan change
    (which drops that key) is seen by the very next reservation, without a read of its own.
    """

    def __init__(self) -> None:
        self._recent: dict[str, tuple[float, TenantBilling]] = {}
        self._verified: dict[str, tuple[str, TenantBilling]] = {}

    def recent(self, tenant_id: uuid.UUID, now: dt.datetime) -> TenantBilling | None:
        """The snapshot remembered less than a few seconds ago, if its period still runs."""
        entry = self._recent.get(str(tenant_id))
        if entry is not None and entry[0] > time.monotonic() and entry[1].period.end > now:
            return entry[1]
        return None

    def remember(self, snapshot: TenantBilling) -> None:
        """Keep ``snapshot`` as recent."""
        if len(self._recent) >= LOCAL_BILLING_MAX:
            self._recent.clear()
        expires = time.monotonic() + LOCAL_BILLING_CACHE_SECONDS
        self._recent[str(snapshot.tenant_id)] = (expires, snapshot)

    def verified(self, tenant_id: uuid.UUID, now: dt.datetime) -> tuple[str, TenantBilling] | None:
        """``(SHA-1, snapshot)`` kept for the reservation script, if its period still runs."""
        entry = self._verified.get(str(tenant_id))
        if entry is not None and entry[1].period.end > now:
            return entry
        return None

    def verify(self, digest: str, snapshot: TenantBilling) -> tuple[str, TenantBilling]:
        """Keep ``snapshot`` with the SHA-1 of its JSON in Redis."""
        if len(self._verified) >= LOCAL_BILLING_MAX:
            self._verified.clear()
        entry = self._verified[str(snapshot.tenant_id)] = (digest, snapshot)
        return entry

    def forget(self, tenant_id: uuid.UUID | str) -> None:
        """Drop both copies of a tenant's snapshot."""
        self._recent.pop(str(tenant_id), None)
        self._verified.pop(str(tenant_id), None)


def billing_cache_key(tenant_id: uuid.UUID | str) -> str:
    """Redis key of a tenant's cached :class:`TenantBilling`."""
    return f"atrium:t:{tenant_id}:billing"


def usage_key(tenant_id: uuid.UUID | str, tag: str) -> str:
    """Redis hash of a tenant's usage figures for one period (``level`` for levels)."""
    return f"atrium:t:{tenant_id}:usage:{tag}"


def reservations_key(tenant_id: uuid.UUID | str, tag: str, metric: Metric) -> str:
    """Redis sorted set of a metric's reservations in flight (score: expiry in ms)."""
    return f"atrium:t:{tenant_id}:resv:{tag}:{metric.value}"


def alerts_key(tenant_id: uuid.UUID | str, tag: str) -> str:
    """Redis set of the usage warnings already handled this period (a fast path; the
    ``usage_alerts`` table is what guarantees once)."""
    return f"atrium:t:{tenant_id}:alerts:{tag}"
