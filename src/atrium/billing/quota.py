"""The quota engine: reserve before the work, settle after it, exactly, across every replica.

How a unit of work is counted::

    async with quota.reserve(request, tenant_id, Metric.searches, 1) as r:
        hits = await search(...)          # raises -> the reservation is given back
        r.settle(1)                        # optional: the actual amount (default: reserved)

1. **Reserve** (one Redis Lua script, atomic): admitted only if ``used + reserved + amount <=
   limit``; the reservation is a member of a per-metric sorted set scored by its expiry, so a
   crashed worker's reservation lapses on its own instead of leaking capacity forever.
2. **Settle**: MySQL first (``usage_counters`` row: ``used += actual, version += 1`` and the
   day's ``usage_daily`` figure, in one short transaction), then one Lua script removes the
   reservation and writes the committed figure into Redis only when its version is newer than
   the one Redis holds. MySQL is the source of truth; Redis is a cache of it plus the
   reservations in flight.
3. **Release** (the work failed before :meth:`Reservation.settle`): the reservation is removed.
4. **Rebuild**: when the Redis hash of a period is missing (flushed, evicted, expired), the
   first reserve reloads the figures from MySQL (version-checked, so a settle racing with the
   reload cannot be lost or counted twice).

Metrics are of two kinds: *levels* (members, collections, documents, stored bytes, chunks) that
go up and down and never reset, and *monthly* totals (searches, answers, LLM and embedding
tokens) that reset at the start of each billing period.

Quota writes use their own small connection pool (``app.state.quota_sessionmaker``): a request
already holds a connection of the main pool for its whole unit of work, and borrowing a second
one from the same pool deadlocks once every connection is held by a request waiting for its
second.

On SQLite (the embedded default) that second connection would wait for a lock its own request
holds: SQLite has one write lock per database file, and the request's unit of work keeps it
from its first write until it commits. So, on SQLite only, what a request settles or adjusts
through :func:`reserve` and :func:`adjust` is recorded right *after* the request's commit (an
:func:`atrium.kit.db.after_commit` hook), and given back if it rolls back; the reservation
keeps the capacity held until then, so limits stay exact. See docs/decisions/0005.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import enum
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError
from sqlalchemy import Table, and_, case, func, insert, select, tuple_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from atrium.billing.plans import Limit, PlanCatalog, get_catalog
from atrium.config import Settings
from atrium.kit import metrics
from atrium.kit.db import after_commit, write_session
from atrium.kit.enqueue import enqueue, send_jobs
from atrium.kit.errors import NotFound, PaymentRequired
from atrium.models import Membership, Role, Tenant, User
from atrium.models.billing import (
    LEVEL_PERIOD,
    BillingAccount,
    UsageAlert,
    UsageCounter,
    UsageDaily,
)
from atrium.models.tenancy import TenantStatus

log = structlog.get_logger("atrium.billing.quota")

_COUNTERS = cast(Table, UsageCounter.__table__)
_DAILY = cast(Table, UsageDaily.__table__)
_ALERTS = cast(Table, UsageAlert.__table__)
_ACCOUNTS = cast(Table, BillingAccount.__table__)
_USERS = cast(Table, User.__table__)

T = TypeVar("T")

#: Seconds a reservation holds capacity when its holder never settles nor releases it.
DEFAULT_RESERVATION_TTL = 600
#: High-frequency work (searches, answers, LLM tokens) is recorded in MySQL in batches: at most
#: this many seconds after the work, in one transaction per batch. Until then its reservation
#: keeps holding the capacity in Redis, so limits stay exact; only the MySQL figures lag.
BATCH_FLUSH_SECONDS = 1.0
#: A batch this large is written at once instead of waiting for the timer.
BATCH_MAX = 500
#: How long a tenant's plan/period snapshot is cached in Redis.
BILLING_CACHE_SECONDS = 300
#: ... and in each process: a plan change reaches other replicas within this many seconds
#: (the replica that made it forgets at once). Saves a Redis round trip on every request.
LOCAL_BILLING_CACHE_SECONDS = 5.0
_LOCAL_BILLING_MAX = 10_000
#: Snapshots that :meth:`Quota.hold` checks against Redis in its own round trip, by tenant:
#: (SHA-1 of the JSON in Redis, snapshot). Per process, shared by every engine in it.
_VERIFIED: dict[str, tuple[str, TenantBilling]] = {}
#: Usage warnings are mailed when a metric reaches these percentages of its limit.
ALERT_THRESHOLDS = (80, 100)


class Metric(enum.StrEnum):
    """Something metered. Levels go up and down; the others are monthly totals."""

    members = "members"
    collections = "collections"
    documents = "documents"
    stored_bytes = "stored_bytes"
    chunks = "chunks"
    searches = "searches"
    answers = "answers"
    llm_tokens = "llm_tokens"
    embedding_tokens = "embedding_tokens"

    @property
    def is_level(self) -> bool:
        """Whether this is a level (never resets) rather than a monthly total."""
        return self in LEVEL_METRICS

    @property
    def limit(self) -> Limit:
        """The plan limit that caps this metric."""
        return METRIC_LIMITS[self]

    @property
    def label(self) -> str:
        """Human wording for mails and messages."""
        return self.value.replace("_", " ")


LEVEL_METRICS = frozenset(
    {Metric.members, Metric.collections, Metric.documents, Metric.stored_bytes, Metric.chunks}
)
METRIC_LIMITS: dict[Metric, Limit] = {
    Metric.members: Limit.members,
    Metric.collections: Limit.collections,
    Metric.documents: Limit.documents,
    Metric.stored_bytes: Limit.stored_bytes,
    Metric.chunks: Limit.chunks,
    Metric.searches: Limit.searches_per_month,
    Metric.answers: Limit.answers_per_month,
    Metric.llm_tokens: Limit.llm_tokens_per_month,
    Metric.embedding_tokens: Limit.embedding_tokens_per_month,
}


class QuotaExceeded(PaymentRequired):
    """A plan limit would be exceeded (402). ``detail``: metric, limit, used, resets_at."""

    def __init__(
        self, metric: Metric, limit: int, used: int, resets_at: dt.datetime | None, plan: str
    ) -> None:
        when = f"; it resets at {resets_at.isoformat()}" if resets_at else ""
        per = " this month" if not metric.is_level else ""
        message = (
            f"The {plan} plan allows {limit} {metric.label}{per} and {used} are used{when}. "
            "Upgrade the plan or free some capacity."
        )
        super().__init__(
            message,
            detail={
                "metric": metric.value,
                "limit": limit,
                "used": used,
                "resets_at": resets_at.isoformat() if resets_at else None,
                "message": message,
            },
        )
        self.metric = metric


# Periods ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """A billing period ``[start, end)``."""

    start: dt.datetime
    end: dt.datetime


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


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _tag(period_start: dt.datetime) -> str:
    return period_start.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S")


# A tenant's billing snapshot --------------------------------------------------------------------


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
        limits = dict(catalog.get(self.plan).limits)
        for key, value in self.overrides.items():
            if key in Limit.__members__:
                limits[Limit(key)] = value
        return limits

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


# Lua scripts -------------------------------------------------------------------------------------

# KEYS: usage hash, reservations zset. ARGV: metric, amount, limit (-1: none), now ms,
# reservation expiry ms, reservation member ("<id>:<amount>"), zset ttl ms.
# Returns {admitted (1, 0, or -1 when the hash must be rebuilt first), used, reserved}.
_RESERVE = """
if redis.call('HEXISTS', KEYS[1], '_loaded') == 0 then return {-1, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
local reserved = 0
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
for i = 1, #members do
  reserved = reserved + tonumber(string.match(members[i], ':(%d+)$'))
end
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local amount = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
if limit >= 0 and used + reserved + amount > limit then
  return {0, used, reserved}
end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return {1, used, reserved + amount}
"""

# Several metrics held at once, all or none (a document's embedding tokens and chunks).
# KEYS: the billing snapshot key, then (usage hash, reservations zset) per metric.
# ARGV: SHA-1 of the snapshot the limits come from, now ms, then per metric: metric, amount,
# limit (-1: none), reservation expiry ms, member, zset ttl ms.
# Returns {1} when every hold is in; {-2} when the snapshot changed or is gone (a plan change:
# reread it); {-1, i} when metric i's hash must be rebuilt first; {0, i, used, reserved} when
# metric i does not fit (nothing is held then).
_RESERVE_MANY = """
local snapshot = redis.call('GET', KEYS[1])
if not snapshot or redis.sha1hex(snapshot) ~= ARGV[1] then return {-2} end
local n = (#KEYS - 1) / 2
for i = 1, n do
  if redis.call('HEXISTS', KEYS[2 * i], '_loaded') == 0 then return {-1, i} end
end
for i = 1, n do
  local zset = KEYS[2 * i + 1]
  local a = 2 + (i - 1) * 6
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', ARGV[2])
  local reserved = 0
  local members = redis.call('ZRANGE', zset, 0, -1)
  for j = 1, #members do
    reserved = reserved + tonumber(string.match(members[j], ':(%d+)$'))
  end
  local used = tonumber(redis.call('HGET', KEYS[2 * i], ARGV[a + 1]) or '0')
  local limit = tonumber(ARGV[a + 3])
  if limit >= 0 and used + reserved + tonumber(ARGV[a + 2]) > limit then
    return {0, i, used, reserved}
  end
end
for i = 1, n do
  local a = 2 + (i - 1) * 6
  redis.call('ZADD', KEYS[2 * i + 1], ARGV[a + 4], ARGV[a + 5])
  redis.call('PEXPIRE', KEYS[2 * i + 1], ARGV[a + 6])
end
return {1}
"""

# KEYS: usage hash, reservations zset. ARGV: metric, member ('' for none), committed used,
# its version, hash ttl ms, then any further members settled by the same write (a batch).
# Writes the figure only if newer than what the hash holds; works on a hash that is not loaded
# yet, so a rebuild racing with this settle keeps the newest figure.
_SETTLE = """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
for i = 6, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
local vf = ARGV[1] .. ':v'
local current = tonumber(redis.call('HGET', KEYS[1], vf) or '-1')
if tonumber(ARGV[4]) > current then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], vf, ARGV[4])
end
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
return redis.call('HGET', KEYS[1], ARGV[1])
"""

# KEYS: usage hash. ARGV: ttl ms, then (metric, used, version) triples read from MySQL.
_LOAD = """
if redis.call('HEXISTS', KEYS[1], '_loaded') == 1 then return 0 end
for i = 2, #ARGV, 3 do
  local vf = ARGV[i] .. ':v'
  local current = tonumber(redis.call('HGET', KEYS[1], vf) or '-1')
  if tonumber(ARGV[i + 2]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], vf, ARGV[i + 2])
  end
end
redis.call('HSET', KEYS[1], '_loaded', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


# SQL helpers ------------------------------------------------------------------------------------


def _insert_ignore(session: AsyncSession, table: Any) -> Any:
    stmt = insert(table)
    dialect = session.bind.dialect.name if session.bind is not None else ""
    return stmt.prefix_with("OR IGNORE" if dialect == "sqlite" else "IGNORE")


async def _with_retry(fn: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
    """Run a short transaction again when MariaDB picks it as a deadlock victim."""
    for attempt in range(attempts):
        try:
            return await fn()
        except OperationalError as exc:
            code = getattr(exc.orig, "args", [None])[0]
            # 1213: deadlock; 1205: lock wait time-out; "database is locked" on SQLite.
            retryable = code in (1213, 1205) or "locked" in str(exc.orig)
            if not retryable or attempt == attempts - 1:
                raise
            log.warning("quota_write_retried", attempt=attempt + 1, error=str(exc.orig))
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


async def add_to_counter(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    metric: Metric,
    period_start: dt.datetime,
    delta: int,
    *,
    absolute: bool = False,
) -> tuple[int, int]:
    """Change a usage counter in ``session``'s transaction; returns ``(used, version)``.

    ``delta`` is added (never going below zero), or set when ``absolute``. The update locks
    the row, so concurrent changes are applied one after the other and each gets its own
    version.
    """
    t = _COUNTERS
    now = _utcnow()
    key = and_(
        t.c.tenant_id == tenant_id, t.c.metric == metric.value, t.c.period_start == period_start
    )
    new_used: Any = delta if absolute else case((t.c.used + delta < 0, 0), else_=t.c.used + delta)
    values = {"used": new_used, "version": t.c.version + 1, "updated_at": now}
    result = await session.execute(update(t).where(key).values(**values))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        inserted = await session.execute(
            _insert_ignore(session, t).values(
                tenant_id=tenant_id,
                metric=metric.value,
                period_start=period_start,
                used=max(0, delta),
                version=1,
                updated_at=now,
            )
        )
        if inserted.rowcount == 0:  # type: ignore[attr-defined]
            # Another transaction inserted it first: add to its row.
            await session.execute(update(t).where(key).values(**values))
    row = (await session.execute(select(t.c.used, t.c.version).where(key))).one()
    return int(row.used), int(row.version)


async def _record_daily(
    session: AsyncSession, tenant_id: uuid.UUID, metric: Metric, delta: int, level: int
) -> None:
    t = _DAILY
    day = _utcnow().date()
    key = and_(t.c.tenant_id == tenant_id, t.c.metric == metric.value, t.c.day == day)
    # Levels record where the day ended; monthly metrics what the day consumed.
    value: Any = level if metric.is_level else t.c.value + delta
    result = await session.execute(update(t).where(key).values(value=value))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        first = level if metric.is_level else delta
        inserted = await session.execute(
            _insert_ignore(session, t).values(
                tenant_id=tenant_id, metric=metric.value, day=day, value=first
            )
        )
        if inserted.rowcount == 0:  # type: ignore[attr-defined]
            await session.execute(update(t).where(key).values(value=value))


def _upsert(session: AsyncSession, table: Table, rows: list[dict[str, Any]], update: Any) -> Any:
    """A multi-row INSERT that updates the rows already there (``update(new)`` gives the SET
    clause, ``new`` being the row that was to be inserted), on MySQL/MariaDB and SQLite."""
    dialect = session.bind.dialect.name if session.bind is not None else ""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite = sqlite_insert(table).values(rows)
        return lite.on_conflict_do_update(
            index_elements=list(table.primary_key.columns), set_=update(lite.excluded)
        )
    from sqlalchemy.dialects.mysql import insert as mysql_insert

    my = mysql_insert(table).values(rows)
    return my.on_duplicate_key_update(**update(my.inserted))


async def _write_groups(
    session: AsyncSession, groups: list[_Group]
) -> list[tuple[int, int] | None]:
    """A batch's counters and daily figures in at most five statements, however many tenants
    it holds (a statement per tenant made each batch's cost grow with the number of active
    tenants, and with it the latency of the searches sharing the process).

    Returns:
        ``(used, version)`` per group, in order; None for a tenant deleted since its work was
        done (nobody is left to bill, and its rows would break the foreign key).
    """
    if not groups:
        return []
    now = _utcnow()
    t, d = _COUNTERS, _DAILY
    wanted = {g.billing.tenant_id for g in groups}
    live = set((await session.execute(select(Tenant.id).where(Tenant.id.in_(wanted)))).scalars())
    keep = [g for g in groups if g.billing.tenant_id in live]
    for gone in wanted - live:
        log.info("usage_of_deleted_tenant_dropped", tenant_id=str(gone))
    figures: dict[tuple[uuid.UUID, str, str], tuple[int, int]] = {}
    if keep:
        # Rows are written (and locked) in the batch's sorted order: no deadlocks between
        # processes flushing at the same time.
        await session.execute(
            _upsert(
                session,
                t,
                [
                    {
                        "tenant_id": g.billing.tenant_id,
                        "metric": g.metric.value,
                        "period_start": g.period_start,
                        "used": g.amount,
                        "version": 1,
                        "updated_at": now,
                    }
                    for g in keep
                ],
                lambda new: {
                    "used": t.c.used + new.used,
                    "version": t.c.version + 1,
                    "updated_at": new.updated_at,
                },
            )
        )
        read = await session.execute(
            select(t.c.tenant_id, t.c.metric, t.c.period_start, t.c.used, t.c.version).where(
                tuple_(t.c.tenant_id, t.c.metric, t.c.period_start).in_(
                    [(g.billing.tenant_id, g.metric.value, g.period_start) for g in keep]
                )
            )
        )
        for row in read:
            figures[(row.tenant_id, row.metric, _tag(row.period_start))] = (
                int(row.used),
                int(row.version),
            )
        # The day's figures: what the day consumed (monthly metrics), or where a level
        # stands at the end of it.
        day = now.date()
        for level in (False, True):
            rows = [
                {
                    "tenant_id": g.billing.tenant_id,
                    "metric": g.metric.value,
                    "day": day,
                    "value": figures[_group_key(g)][0] if level else g.amount,
                }
                for g in keep
                if g.metric.is_level is level
            ]
            if rows:
                await session.execute(
                    _upsert(
                        session,
                        d,
                        rows,
                        (lambda new: {"value": new.value})
                        if level
                        else (lambda new: {"value": d.c.value + new.value}),
                    )
                )
    return [figures[_group_key(g)] if g.billing.tenant_id in live else None for g in groups]


def _group_key(g: _Group) -> tuple[uuid.UUID, str, str]:
    return (g.billing.tenant_id, g.metric.value, _tag(g.period_start))


# The engine -------------------------------------------------------------------------------------


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


@dataclass
class _Group:
    """Settlements of one tenant, metric and period in a batch."""

    billing: TenantBilling
    metric: Metric
    tag: str
    period_start: dt.datetime
    amount: int = 0
    members: list[str] = field(default_factory=list)


class Quota:
    """Reservations, settlements and figures for every tenant; cheap to build, stateless.

    Build it with :meth:`of` from a request, an app, or a task's ``runtime.resources()``.
    """

    def __init__(
        self,
        redis: Redis,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        catalog: PlanCatalog | None = None,
    ) -> None:
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.catalog = catalog or get_catalog()
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._load = redis.register_script(_LOAD)
        self._reserve_many = redis.register_script(_RESERVE_MANY)
        self._local: dict[str, tuple[float, TenantBilling]] = {}
        #: Settled work waiting for the next batched write (see :meth:`record_later`).
        self._batch: list[tuple[Reservation, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def of(cls, ctx: Any) -> Quota:
        """The quota engine for ``ctx``: a Request, a FastAPI app, a :class:`Quota`, or an
        object with ``redis``, ``sessionmaker`` and ``settings`` (``runtime.resources()``)."""
        if isinstance(ctx, Quota):
            return ctx
        app = getattr(ctx, "app", None)
        if app is not None and hasattr(app, "state"):
            ctx = app
        state = getattr(ctx, "state", None)
        if state is not None and hasattr(state, "redis"):
            quota: Quota | None = getattr(state, "quota", None)
            if quota is None:
                quota = cls(state.redis, _quota_sessionmaker(ctx), state.settings)
                state.quota = quota
            return quota
        return cls(ctx.redis, ctx.sessionmaker, ctx.settings)

    # Billing snapshot ---------------------------------------------------------------------------

    async def billing(self, tenant_id: uuid.UUID, *, fresh: bool = False) -> TenantBilling:
        """The tenant's plan, overrides and current period (cached; rolls the period over when
        beat has not yet).

        Raises:
            NotFound: when the tenant does not exist.
        """
        now = _utcnow()
        clock = time.monotonic()
        if not fresh:
            local = self._local.get(str(tenant_id))
            if local is not None and local[0] > clock and local[1].period.end > now:
                return local[1]
            raw = await self.redis.get(billing_cache_key(tenant_id))
            if raw:
                cached = TenantBilling.from_json(str(raw))
                if cached.period.end > now:
                    self._remember(cached, clock)
                    return cached

        async def load() -> TenantBilling:
            async with self.sessionmaker() as session:
                loaded = await load_billing(session, tenant_id, now)
                await session.commit()
                return loaded

        snapshot = await _with_retry(load)
        ttl = min(BILLING_CACHE_SECONDS, int((snapshot.period.end - now).total_seconds()) + 1)
        await self.redis.set(billing_cache_key(tenant_id), snapshot.to_json(), ex=max(1, ttl))
        self._remember(snapshot, clock)
        return snapshot

    def _remember(self, snapshot: TenantBilling, clock: float) -> None:
        if len(self._local) >= _LOCAL_BILLING_MAX:
            self._local.clear()
        self._local[str(snapshot.tenant_id)] = (clock + LOCAL_BILLING_CACHE_SECONDS, snapshot)

    async def forget_billing(self, tenant_id: uuid.UUID | str) -> None:
        """Drop the cached snapshot (after a plan change, an override or a rollover)."""
        self._local.pop(str(tenant_id), None)
        await self.redis.delete(billing_cache_key(tenant_id))

    async def limits(self, tenant_id: uuid.UUID) -> dict[Limit, int | None]:
        """The tenant's effective limits."""
        return (await self.billing(tenant_id)).limits(self.catalog)

    # Reservations -------------------------------------------------------------------------------

    def reserve(
        self,
        tenant_id: uuid.UUID,
        metric: Metric,
        amount: int,
        *,
        ttl_seconds: int = DEFAULT_RESERVATION_TTL,
    ) -> Reservation:
        """A reservation of ``amount`` of ``metric``; use it as ``async with``.

        On entry it is admitted or raises :class:`QuotaExceeded` (402). On a clean exit the
        settled amount (default: ``amount``) is recorded; when the block raises before
        :meth:`Reservation.settle` was called, the reservation is given back.
        """
        return Reservation(self, tenant_id, metric, amount, ttl_seconds)

    async def hold(
        self,
        tenant_id: uuid.UUID,
        holds: Sequence[tuple[Metric, int]],
        *,
        ttl_seconds: int = DEFAULT_RESERVATION_TTL,
    ) -> list[Reservation]:
        """Hold several metrics at once, all or none, in one Redis round trip.

        For work that knows all its amounts up front (a document: its embedding tokens and
        chunks). The plan snapshot is kept in this process and checked in the same script (the
        JSON in Redis must still have the SHA-1 it had): a plan change, which drops that key,
        is seen by the next hold, without a read of its own. Settle or release each returned
        reservation as usual (:meth:`Reservation.record_later`, :meth:`Reservation.commit`,
        :meth:`Reservation.release`); an amount of 0 holds nothing.

        Raises:
            QuotaExceeded: for the first metric that does not fit (then nothing is held).
        """
        reservations = [Reservation(self, tenant_id, m, a, ttl_seconds) for m, a in holds]
        live = [r for r in reservations if r.amount > 0]
        stale = False
        for _ in range(5):
            digest, billing = await self._verified_billing(tenant_id, stale=stale)
            stale = False
            if not live:
                break
            now_ms = int(_utcnow().timestamp() * 1000)
            keys: list[str] = [billing_cache_key(tenant_id)]
            args: list[Any] = [digest, now_ms]
            limits: list[int | None] = []
            for r in live:
                limit = billing.limit(self.catalog, r.metric.limit)
                tag, _ = await self._period_for(billing, r.metric)
                keys += [usage_key(tenant_id, tag), reservations_key(tenant_id, tag, r.metric)]
                args += [
                    r.metric.value,
                    r.amount,
                    -1 if limit is None else limit,
                    now_ms + ttl_seconds * 1000,
                    r.member,
                    ttl_seconds * 1000 + 60_000,
                ]
                limits.append(limit)
            reply = await self._reserve_many(keys=keys, args=args)
            status = int(reply[0])
            if status == -2:
                stale = True
                continue
            if status == -1:
                await self.ensure_loaded(billing, live[int(reply[1]) - 1].metric)
                continue
            if status == 0:
                index = int(reply[1]) - 1
                refused, limit = live[index], limits[index]
                assert limit is not None
                metrics.record_quota_rejection(refused.metric.value)
                raise QuotaExceeded(
                    refused.metric,
                    limit,
                    int(reply[2]) + int(reply[3]),
                    None if refused.metric.is_level else billing.period.end,
                    billing.plan,
                )
            for r in live:
                r._held = True
            break
        else:
            raise RuntimeError("quota holds could not be placed (counters or plan kept changing)")
        for r in reservations:
            r._billing = billing
        return reservations

    async def _verified_billing(
        self, tenant_id: uuid.UUID, *, stale: bool
    ) -> tuple[str, TenantBilling]:
        """The snapshot :meth:`hold` checks, with the SHA-1 of its JSON in Redis."""
        key = str(tenant_id)
        now = _utcnow()
        entry = None if stale else _VERIFIED.get(key)
        if entry is not None and entry[1].period.end > now:
            return entry
        raw = await self.redis.get(billing_cache_key(tenant_id))
        snapshot = TenantBilling.from_json(str(raw)) if raw else None
        if snapshot is None or snapshot.period.end <= now:
            # Loads it from MySQL and puts exactly this JSON in Redis.
            snapshot = await self.billing(tenant_id, fresh=True)
            raw = snapshot.to_json()
        digest = hashlib.sha1(str(raw).encode(), usedforsecurity=False).hexdigest()
        if len(_VERIFIED) >= _LOCAL_BILLING_MAX:
            _VERIFIED.clear()
        _VERIFIED[key] = entry = (digest, snapshot)
        return entry

    async def _period_for(self, billing: TenantBilling, metric: Metric) -> tuple[str, dt.datetime]:
        if metric.is_level:
            return "level", LEVEL_PERIOD
        return _tag(billing.period.start), billing.period.start

    def _hash_ttl_ms(self, billing: TenantBilling, metric: Metric) -> int:
        if metric.is_level:
            return 30 * 86400 * 1000
        left = (billing.period.end - _utcnow()).total_seconds()
        return int((max(0.0, left) + 7 * 86400) * 1000)

    async def ensure_loaded(self, billing: TenantBilling, metric: Metric) -> None:
        """Rebuild the Redis hash of ``metric``'s period from MySQL if Redis lost it."""
        tag, period_start = await self._period_for(billing, metric)
        key = usage_key(billing.tenant_id, tag)
        if await self.redis.hexists(key, "_loaded"):
            return
        t = _COUNTERS
        async with self.sessionmaker() as session:
            rows = (
                await session.execute(
                    select(t.c.metric, t.c.used, t.c.version).where(
                        t.c.tenant_id == billing.tenant_id, t.c.period_start == period_start
                    )
                )
            ).all()
        args: list[Any] = [self._hash_ttl_ms(billing, metric)]
        for row in rows:
            args.extend([row.metric, int(row.used), int(row.version)])
        if await self._load(keys=[key], args=args):
            log.info(
                "usage_rebuilt", tenant_id=str(billing.tenant_id), period=tag, metrics=len(rows)
            )

    async def _try_reserve(
        self,
        billing: TenantBilling,
        metric: Metric,
        amount: int,
        member: str,
        ttl_seconds: int,
        alongside: Sequence[tuple[str, ...]] = (),
        replies: list[Any] | None = None,
    ) -> tuple[bool, int, int, int | None]:
        limit = billing.limit(self.catalog, metric.limit)
        tag, _ = await self._period_for(billing, metric)
        now_ms = int(_utcnow().timestamp() * 1000)
        keys = [usage_key(billing.tenant_id, tag), reservations_key(billing.tenant_id, tag, metric)]
        args = [
            metric.value,
            amount,
            -1 if limit is None else limit,
            now_ms,
            now_ms + ttl_seconds * 1000,
            member,
            ttl_seconds * 1000 + 60_000,
        ]
        first: Any = None
        if alongside:
            # The reservation and the caller's reads in one round trip. EVALSHA, not the
            # Script object: in a pipeline that would first ask SCRIPT EXISTS (a round trip).
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.evalsha(self._reserve.sha, len(keys), *keys, *args)
                for command in alongside:
                    pipe.execute_command(*command)
                out = await pipe.execute(raise_on_error=False)
            for reply in out[1:]:
                if isinstance(reply, Exception):
                    raise reply
            if replies is not None:
                replies.extend(out[1:])
            if not isinstance(out[0], NoScriptError):
                first = out[0]
        for _ in range(3):
            if first is None:
                first = await self._reserve(keys=keys, args=args)
            admitted, used, reserved = first
            if int(admitted) >= 0:
                return bool(int(admitted)), int(used), int(reserved), limit
            first = None
            await self.ensure_loaded(billing, metric)
        raise RuntimeError("usage counters could not be loaded into Redis")

    async def _apply(
        self,
        billing: TenantBilling,
        metric: Metric,
        delta: int,
        *,
        member: str = "",
        absolute: bool = False,
    ) -> int:
        """Record a change in MySQL, then mirror it (and drop the reservation) in Redis."""
        tag, period_start = await self._period_for(billing, metric)

        async def write() -> tuple[int, int]:
            async with write_session(self.sessionmaker) as session:
                used, version = await add_to_counter(
                    session, billing.tenant_id, metric, period_start, delta, absolute=absolute
                )
                await _record_daily(session, billing.tenant_id, metric, delta, used)
                await session.commit()
                return used, version

        used, version = await _with_retry(write)
        await self._settle(
            keys=[
                usage_key(billing.tenant_id, tag),
                reservations_key(billing.tenant_id, tag, metric),
            ],
            args=[metric.value, member, used, version, self._hash_ttl_ms(billing, metric)],
        )
        if delta > 0 or absolute:
            await self._maybe_alert(billing, metric, used)
        return used

    async def adjust(self, tenant_id: uuid.UUID, metric: Metric, delta: int) -> int:
        """Change a level without a limit check (``-1`` when a document is deleted...).

        Returns:
            The new figure.
        """
        if delta == 0:
            return (await self.usage_of(tenant_id, metric)).used
        return await self._apply(await self.billing(tenant_id), metric, delta)

    async def set_level(self, tenant_id: uuid.UUID, metric: Metric, value: int) -> int:
        """Set a level to a value counted from the real rows (reconciliation)."""
        if not metric.is_level:
            raise ValueError(f"{metric} is a monthly total; only levels can be set")
        return await self._apply(await self.billing(tenant_id), metric, value, absolute=True)

    # Batched recording ---------------------------------------------------------------------------

    def record_later(self, reservation: Reservation, amount: int) -> None:
        """Queue settled work for the next batched write (within :data:`BATCH_FLUSH_SECONDS`).

        The reservation stays in Redis until the write has mirrored the new figure there, so
        ``used + reserved`` never drops in between and limits stay exact. A search then costs
        its caller one Redis script (the reservation) instead of a MySQL transaction: batches
        add every tenant's searches of the last second in one transaction.
        """
        self._batch.append((reservation, amount))
        loop = asyncio.get_running_loop()
        if len(self._batch) >= BATCH_MAX:
            self._start_flush()
        elif self._timer is None:
            self._timer = loop.call_later(BATCH_FLUSH_SECONDS, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        # Keep a reference until done: the loop holds tasks only weakly.
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def flush(self, within: AsyncSession | None = None) -> None:
        """Write every queued settlement now: one MySQL transaction, then one Redis round trip.

        Called by the timer, before usage figures are read (so a caller sees its own work
        counted at once), and at shutdown. When MySQL cannot be written the work is queued
        again for the next attempt; the reservations keep holding the capacity meanwhile.

        Args:
            within: an open :func:`~atrium.kit.db.unit_of_work` to write the figures in, so
                they commit with the caller's own rows (a document's settlements with its
                ``ready``: one transaction less per document). Redis is updated once that
                commits; on a rollback the work is queued again. Without one (or when it is
                no longer open), the batch gets its own transaction.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        groups: dict[tuple[str, str, str], _Group] = {}
        for reservation, amount in batch:
            billing = reservation._billing
            assert billing is not None
            tag, period_start = await self._period_for(billing, reservation.metric)
            key = (str(billing.tenant_id), reservation.metric.value, tag)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(billing, reservation.metric, tag, period_start)
            group.amount += amount
            if reservation._held:
                group.members.append(reservation.member)
        # Rows are locked in one order by every process, so concurrent batches never deadlock.
        ordered = [groups[k] for k in sorted(groups)]

        async def write_in(session: AsyncSession) -> list[tuple[int, int] | None]:
            return await _write_groups(session, ordered)

        if within is not None:
            written: list[tuple[int, int] | None] = []

            async def when_done(committed: bool) -> None:
                if committed:
                    await self._mirror(ordered, written)
                else:
                    self._requeue(batch)

            if after_commit(within, when_done):
                # A failure here propagates to the caller, whose rollback queues the work again.
                written.extend(await write_in(within))
                return

        async def write() -> list[tuple[int, int] | None]:
            async with write_session(self.sessionmaker) as session:
                out = await write_in(session)
                await session.commit()
                return out

        try:
            figures = await _with_retry(write)
        except Exception:
            log.exception(
                "usage_batch_not_recorded_yet", settlements=len(batch), groups=len(ordered)
            )
            self._requeue(batch)
            return
        await self._mirror(ordered, figures)

    def _requeue(self, batch: list[tuple[Reservation, int]]) -> None:
        """Queue work whose write failed for the next attempt."""
        self._batch[:0] = batch
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                BATCH_FLUSH_SECONDS, self._start_flush
            )

    async def _mirror(self, ordered: list[_Group], figures: list[tuple[int, int] | None]) -> None:
        """Copy written figures to Redis (dropping the batch's reservations), then warn."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for g, figure in zip(ordered, figures, strict=True):
                    if figure is None:
                        continue
                    used, version = figure
                    await self._settle(
                        keys=[
                            usage_key(g.billing.tenant_id, g.tag),
                            reservations_key(g.billing.tenant_id, g.tag, g.metric),
                        ],
                        args=[
                            g.metric.value,
                            "",
                            used,
                            version,
                            self._hash_ttl_ms(g.billing, g.metric),
                            *g.members,
                        ],
                        client=pipe,
                    )
                await pipe.execute()
        except Exception:
            # MySQL has the figures; Redis catches up at its next rebuild or settle, and the
            # reservations lapse on their own.
            log.exception("usage_batch_not_mirrored", groups=len(ordered))
        for g, figure in zip(ordered, figures, strict=True):
            if figure is not None and g.amount > 0:
                await self._maybe_alert(g.billing, g.metric, figure[0])

    async def close(self) -> None:
        """Write what is queued and wait for writes in flight (at shutdown)."""
        await self.flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    # Warnings -----------------------------------------------------------------------------------

    async def _maybe_alert(self, billing: TenantBilling, metric: Metric, used: int) -> None:
        limit = billing.limit(self.catalog, metric.limit)
        if not limit:
            return
        crossed = [t for t in ALERT_THRESHOLDS if used * 100 >= t * limit]
        if not crossed:
            return
        top = max(crossed)
        period_tag = _tag(billing.period.start)
        # Fast path: most settles past 80% find the warning handled and stop here.
        if not await self.redis.sadd(alerts_key(billing.tenant_id, period_tag), f"{metric}:{top}"):
            return
        await self.redis.expire(
            alerts_key(billing.tenant_id, period_tag),
            self._hash_ttl_ms(billing, Metric.searches) // 1000,
        )
        try:
            await send_usage_warning(self, billing, metric, top, crossed, used, limit)
        except Exception:
            # A warning mail must never fail the work it reports on.
            log.exception("usage_warning_failed", tenant_id=str(billing.tenant_id), metric=metric)

    # Figures ------------------------------------------------------------------------------------

    async def usage_of(self, tenant_id: uuid.UUID, metric: Metric) -> MetricUsage:
        """One metric's figures (rebuilding Redis from MySQL if needed)."""
        return (await self.usage(tenant_id, [metric]))[0]

    async def usage(
        self, tenant_id: uuid.UUID, metrics: list[Metric] | None = None
    ) -> list[MetricUsage]:
        """Every metric's used, reserved, limit and reset time, from the Redis counters
        (rebuilt from MySQL when Redis lost them)."""
        await self.flush()
        billing = await self.billing(tenant_id)
        limits = billing.limits(self.catalog)
        metrics = metrics or list(Metric)
        # One rebuild check per period hash (levels, this month), then one round trip.
        for kind in {m.is_level: m for m in metrics}.values():
            await self.ensure_loaded(billing, kind)
        now_ms = int(_utcnow().timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for metric in metrics:
                tag, _ = await self._period_for(billing, metric)
                pipe.hget(usage_key(tenant_id, tag), metric.value)
                pipe.zrangebyscore(reservations_key(tenant_id, tag, metric), now_ms, "+inf")
            replies = await pipe.execute()
        out: list[MetricUsage] = []
        for i, metric in enumerate(metrics):
            used_raw, members = replies[2 * i], replies[2 * i + 1]
            out.append(
                MetricUsage(
                    metric=metric,
                    used=int(used_raw or 0),
                    reserved=sum(int(m.rsplit(":", 1)[1]) for m in members),
                    limit=limits[metric.limit],
                    resets_at=None if metric.is_level else billing.period.end,
                )
            )
        return out


class Reservation:
    """Capacity held for a unit of work; see :meth:`Quota.reserve`."""

    def __init__(
        self,
        quota: Quota,
        tenant_id: uuid.UUID,
        metric: Metric,
        amount: int,
        ttl: int,
        defer_to: AsyncSession | None = None,
    ) -> None:
        if amount < 0:
            raise ValueError("a reservation amount cannot be negative")
        self.quota = quota
        self.tenant_id = tenant_id
        self.metric = metric
        self.amount = amount
        self.ttl = ttl
        self.actual: int | None = None
        self.member = f"{uuid.uuid4().hex}:{amount}"
        self._billing: TenantBilling | None = None
        self._held = False
        self._done = False
        #: The request's unit of work whose commit the recording waits for (SQLite only).
        self._defer_to = defer_to
        #: Replies to the commands sent ``alongside`` the reservation (see :meth:`acquire`).
        self.replies: list[Any] = []

    async def acquire(self, alongside: Sequence[tuple[str, ...]] = ()) -> Reservation:
        """Hold the capacity.

        Args:
            alongside: Redis commands to send in the same round trip (a search reads its
                cache versions this way); their replies land in :attr:`replies`.

        Raises:
            QuotaExceeded: when ``amount`` does not fit in what is left.
        """
        billing = await self.quota.billing(self.tenant_id)
        self._billing = billing
        if self.amount == 0:
            if alongside:
                async with self.quota.redis.pipeline(transaction=False) as pipe:
                    for command in alongside:
                        pipe.execute_command(*command)
                    self.replies = list(await pipe.execute())
            return self
        admitted, used, reserved, limit = await self.quota._try_reserve(
            billing,
            self.metric,
            self.amount,
            self.member,
            self.ttl,
            alongside,
            self.replies,
        )
        if not admitted:
            assert limit is not None
            metrics.record_quota_rejection(self.metric.value)
            raise QuotaExceeded(
                self.metric,
                limit,
                used + reserved,
                None if self.metric.is_level else billing.period.end,
                billing.plan,
            )
        self._held = True
        return self

    def settle(self, actual: int) -> None:
        """Say how much the work really used (may differ from the reservation: tokens)."""
        if actual < 0:
            raise ValueError("a settled amount cannot be negative")
        self.actual = actual

    async def commit(self, actual: int | None = None) -> None:
        """Record the work (``actual``, else what :meth:`settle` said, else ``amount``): now,
        or on SQLite inside a request once the request has committed."""
        amount = self._finish(actual)
        if amount is None:
            return
        if self._defer_to is not None and amount != 0:

            async def when_done(committed: bool) -> None:
                # The work's rows are committed (count it) or rolled back (give it back).
                await (self._record(amount) if committed else self.release())

            if after_commit(self._defer_to, when_done):
                return
        await self._record(amount)

    def _finish(self, actual: int | None) -> int | None:
        """Mark the reservation done; the amount to record, or None when it already was."""
        if self._done:
            return None
        self._done = True
        if actual is not None:
            self.actual = actual
        assert self._billing is not None, "acquire() first"
        return self.amount if self.actual is None else self.actual

    async def record_later(self, actual: int | None = None) -> None:
        """Like :meth:`commit`, but recorded in MySQL with the next batch (searches, answers,
        tokens: work done all day long, where a transaction each would cost more than the
        work). The capacity stays held until the batch is written."""
        amount = self._finish(actual)
        if amount is None:
            return
        if amount == 0:
            await self.release()
            return
        self.quota.record_later(self, amount)

    async def _record(self, amount: int) -> None:
        assert self._billing is not None
        if amount == 0:
            # Nothing was used (a duplicate upload...): just give the hold back.
            await self.release()
            return
        try:
            await self.quota._apply(
                self._billing, self.metric, amount, member=self.member if self._held else ""
            )
        except Exception:
            # The work happened; failing its response because the meter is down would be
            # worse than the lost figure. Give the capacity back and say so loudly.
            log.exception(
                "usage_not_recorded",
                tenant_id=str(self.tenant_id),
                metric=self.metric.value,
                amount=amount,
            )
            await self.release()

    async def release(self) -> None:
        """Give the reservation back (the work failed or was not done)."""
        self._done = True
        if not self._held or self._billing is None:
            return
        self._held = False
        tag, _ = await self.quota._period_for(self._billing, self.metric)
        await self.quota.redis.zrem(reservations_key(self.tenant_id, tag, self.metric), self.member)

    async def __aenter__(self) -> Reservation:
        return await self.acquire()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._done:
            return
        if exc_type is None or self.actual is not None:
            # Settled work was done even if something failed after it: count it.
            await self.commit()
        else:
            await self.release()


class Unmetered:
    """What :func:`reserve` returns without a context (a script or a test calling a service
    directly): the same interface, nothing counted, nothing enforced."""

    def settle(self, actual: int) -> None:
        """Ignored."""

    async def commit(self, actual: int | None = None) -> None:
        """Ignored."""

    async def release(self) -> None:
        """Ignored."""

    async def __aenter__(self) -> Unmetered:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        return None


def reserve(
    ctx: Any,
    tenant_id: uuid.UUID,
    metric: Metric,
    amount: int,
    *,
    ttl_seconds: int = DEFAULT_RESERVATION_TTL,
) -> Reservation | Unmetered:
    """``async with reserve(request, tenant_id, Metric.searches, 1) as r: ...`` — see
    :meth:`Quota.reserve`.

    Args:
        ctx: a Request, an app, or ``runtime.resources()`` (in a Celery task). ``None`` (a
            service called without a request) meters nothing.
        tenant_id: whose quota.
        metric: what is used.
        amount: how much to hold (settle the actual amount with ``r.settle(n)``).
        ttl_seconds: how long the hold lasts if the holder dies without settling.
    """
    if ctx is None:
        return Unmetered()
    quota = Quota.of(ctx)
    return Reservation(quota, tenant_id, metric, amount, ttl_seconds, _sqlite_unit_of_work(ctx))


async def adjust(ctx: Any, tenant_id: uuid.UUID, metric: Metric, delta: int) -> None:
    """Change a level without a limit check (``-1`` document when one is deleted...).
    ``ctx`` as for :func:`reserve`; ``None`` meters nothing."""
    if ctx is None or not delta:
        return
    quota = Quota.of(ctx)
    session = _sqlite_unit_of_work(ctx)
    if session is not None:

        async def when_done(committed: bool) -> None:
            if committed:  # rolled back: the change never happened, nothing to record
                await quota.adjust(tenant_id, metric, delta)

        if after_commit(session, when_done):
            return
    await quota.adjust(tenant_id, metric, delta)


def _sqlite_unit_of_work(ctx: Any) -> AsyncSession | None:
    """The request's open unit of work when the account database is SQLite, else ``None``.

    SQLite has a single write lock, held by the request's transaction from its first write to
    its commit: a quota write through another connection meanwhile waits for a lock that is
    only freed after it returns (a self-deadlock that ends in "database is locked"). Deferring
    the write to after the commit is the simplest fix that keeps reserve-before-work exact (the
    hold stays in Redis until then) and leaves MySQL/MariaDB, which locks rows, as it was.
    """
    state = getattr(ctx, "state", None)
    session = getattr(state, "db_session", None) if state is not None else None
    if not isinstance(session, AsyncSession) or session.bind is None:
        return None
    return session if session.bind.dialect.name == "sqlite" else None


def _quota_sessionmaker(app: Any) -> async_sessionmaker[AsyncSession]:
    """The quota engine's own small pool, created on first use and kept on ``app.state``."""
    maker: async_sessionmaker[AsyncSession] | None = getattr(app.state, "quota_sessionmaker", None)
    if maker is None:
        from atrium.kit.db import create_engine, create_sessionmaker

        settings: Settings = app.state.settings
        # On SQLite a quota write waits at most a few seconds for the write lock, so a
        # write that can never get it (see _sqlite_unit_of_work) fails loudly instead of
        # stalling the request for the default 30 s per attempt.
        engine = create_engine(settings.resolved_database_url, pool_size=5, busy_timeout=5.0)
        app.state.quota_engine = engine
        maker = create_sessionmaker(engine)
        app.state.quota_sessionmaker = maker
    return maker


async def close_quota(app: Any) -> None:
    """Write the queued settlements, then dispose the quota pool (at shutdown)."""
    quota: Quota | None = getattr(app.state, "quota", None)
    if quota is not None:
        await quota.close()
    engine = getattr(app.state, "quota_engine", None)
    if engine is not None:
        await engine.dispose()
        app.state.quota_engine = None
        app.state.quota_sessionmaker = None
        app.state.quota = None


# Accounts and periods (SQL) ----------------------------------------------------------------------


def _anchor_of(created_at: dt.datetime) -> dt.datetime:
    # Whole seconds: MySQL DATETIME keeps no fraction, and the period key must round-trip.
    return created_at.astimezone(dt.UTC).replace(microsecond=0)


async def ensure_account(
    session: AsyncSession, tenant_id: uuid.UUID, now: dt.datetime | None = None
) -> BillingAccount:
    """The tenant's billing account, created on first use (periods anchored at the tenant's
    creation; the members level counted from its memberships).

    Raises:
        NotFound: when the tenant does not exist.
    """
    account = await _latest_account(session, tenant_id)
    if account is not None:
        return account
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("Tenant not found")
    now = now or _utcnow()
    anchor = _anchor_of(tenant.created_at or now)
    period = period_containing(anchor, now)
    result = await session.execute(
        _insert_ignore(session, _ACCOUNTS).values(
            tenant_id=tenant_id,
            period_anchor=anchor,
            period_start=period.start,
            period_end=period.end,
            overrides={},
            created_at=now,
            updated_at=now,
        )
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        members = (
            await session.execute(
                select(func.count())
                .select_from(Membership)
                .where(Membership.tenant_id == tenant_id)
            )
        ).scalar_one()
        if members:
            await add_to_counter(
                session, tenant_id, Metric.members, LEVEL_PERIOD, int(members), absolute=True
            )
    # Inserted by us or by a concurrent transaction that committed first: read the latest.
    account = await _latest_account(session, tenant_id)
    assert account is not None
    return account


async def _latest_account(session: AsyncSession, tenant_id: uuid.UUID) -> BillingAccount | None:
    # A locking read sees the latest committed row; a plain one would keep REPEATABLE READ's
    # snapshot and miss the row a concurrent request just created or rolled over.
    result = await session.execute(
        select(BillingAccount)
        .where(BillingAccount.tenant_id == tenant_id)
        .with_for_update(read=True)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


async def roll_period(session: AsyncSession, account: BillingAccount, now: dt.datetime) -> bool:
    """Move the account to the period containing ``now`` if its period ended.

    The update is conditional on the period it read, so beat and a request rolling the same
    tenant at once move it exactly once. Returns whether this call moved it.
    """
    if account.period_end > now:
        return False
    period = period_containing(account.period_anchor, now)
    t = _ACCOUNTS
    result = await session.execute(
        update(t)
        .where(t.c.tenant_id == account.tenant_id, t.c.period_end == account.period_end)
        .values(period_start=period.start, period_end=period.end, updated_at=now)
    )
    moved = bool(result.rowcount)  # type: ignore[attr-defined]
    await _latest_account(session, account.tenant_id)  # refreshes ``account`` in place
    if moved:
        log.info(
            "billing_period_rolled",
            tenant_id=str(account.tenant_id),
            period_start=period.start.isoformat(),
            period_end=period.end.isoformat(),
        )
    return moved


async def load_billing(
    session: AsyncSession, tenant_id: uuid.UUID, now: dt.datetime
) -> TenantBilling:
    """Read (creating or rolling over as needed) the tenant's billing snapshot."""
    account = await ensure_account(session, tenant_id, now)
    await roll_period(session, account, now)
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None or tenant.status is TenantStatus.deleting:
        raise NotFound("Tenant not found")
    return TenantBilling(
        tenant_id=tenant_id,
        tenant_name=tenant.name,
        plan=tenant.plan,
        overrides=dict(account.overrides or {}),
        period=Period(account.period_start, account.period_end),
    )


async def limits_in_session(
    session: AsyncSession, tenant_id: uuid.UUID, catalog: PlanCatalog | None = None
) -> dict[Limit, int | None]:
    """A tenant's effective limits read through the caller's session (no Redis needed)."""
    row = (
        await session.execute(
            select(Tenant.plan, BillingAccount.overrides)
            .outerjoin(BillingAccount, BillingAccount.tenant_id == Tenant.id)
            .where(Tenant.id == tenant_id)
        )
    ).one_or_none()
    catalog = catalog or get_catalog()
    if row is None:
        return dict(catalog.get(catalog.default_plan).limits)
    limits = dict(catalog.get(row.plan).limits)
    for key, value in (row.overrides or {}).items():
        if key in Limit.__members__:
            limits[Limit(key)] = value
    return limits


async def send_usage_warning(
    quota: Quota,
    billing: TenantBilling,
    metric: Metric,
    top: int,
    crossed: list[int],
    used: int,
    limit: int,
) -> None:
    """Record the warning (once per tenant, metric, period and threshold) and mail it to the
    tenant's owners and admins."""
    t = _ALERTS
    now = _utcnow()

    context = {
        "tenant_name": billing.tenant_name,
        "tenant_id": str(billing.tenant_id),
        "plan": billing.plan,
        "metric": metric.value,
        "metric_label": metric.label,
        "threshold": top,
        "used": used,
        "limit": limit,
        "monthly": not metric.is_level,
        "resets_at": billing.period.end.strftime("%Y-%m-%d %H:%M UTC"),
        "usage_url": f"{quota.settings.resolved_public_url}/v1/tenants/{billing.tenant_id}/usage",
    }

    async def write() -> tuple[list[str], AsyncSession]:
        async with write_session(quota.sessionmaker) as session:
            fresh = False
            for threshold in sorted(crossed, reverse=True):
                result = await session.execute(
                    _insert_ignore(session, t).values(
                        tenant_id=billing.tenant_id,
                        metric=metric.value,
                        period_start=billing.period.start,
                        threshold=threshold,
                        created_at=now,
                    )
                )
                if threshold == top:
                    fresh = bool(result.rowcount)  # type: ignore[attr-defined]
            recipients: list[str] = []
            if fresh:
                recipients = list(
                    (
                        await session.execute(
                            select(_USERS.c.email)
                            .join(Membership, Membership.user_id == _USERS.c.id)
                            .where(
                                Membership.tenant_id == billing.tenant_id,
                                Membership.role.in_([Role.owner, Role.admin]),
                                _USERS.c.is_active.is_(True),
                            )
                            .order_by(User.email)
                        )
                    ).scalars()
                )
            # The mails are jobs of the transaction that records the warning: both happen, or
            # neither (the outbox relays them if the broker is down right now). One message
            # per person: recipients do not see each other's addresses.
            for address in recipients:
                enqueue(
                    session,
                    "atrium.email.send",
                    template="usage_warning",
                    to=[address],
                    context=context,
                )
            await session.commit()
            return recipients, session

    recipients, committed = await _with_retry(write)
    if not recipients:
        return
    await send_jobs(committed, quota.sessionmaker)
    log.info(
        "usage_warning_sent",
        tenant_id=str(billing.tenant_id),
        metric=metric.value,
        threshold=top,
        recipients=len(recipients),
    )
