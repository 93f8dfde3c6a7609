"""Every SQL statement of the quota engine: usage counters and daily figures (one row at a time,
or a batch in a few multi-row upserts), billing accounts and their periods, usage warnings.

MySQL/MariaDB is the source of truth; Redis is a cache of it plus the reservations in flight.
Statements are written for MySQL/MariaDB and SQLite (the embedded default) alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import Table, and_, case, func, insert, select, tuple_, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.plans import Limit, PlanCatalog, get_catalog
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.periods import Period, anchor_of, period_containing, period_tag, utcnow
from atrium.billing.quota.snapshot import TenantBilling, apply_overrides
from atrium.kit.errors import NotFound
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


def _dialect(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else ""


def _insert_ignore(session: AsyncSession, table: Table) -> Any:
    stmt = insert(table)
    return stmt.prefix_with("OR IGNORE" if _dialect(session) == "sqlite" else "IGNORE")


def _upsert(
    session: AsyncSession, table: Table, rows: list[dict[str, Any]], set_: Callable[[Any], Any]
) -> Any:
    """A multi-row INSERT that updates the rows already there (``set_(new)`` gives the SET
    clause, ``new`` being the row that was to be inserted), on MySQL/MariaDB and SQLite."""
    if _dialect(session) == "sqlite":
        lite = sqlite_insert(table).values(rows)
        return lite.on_conflict_do_update(
            index_elements=list(table.primary_key.columns), set_=set_(lite.excluded)
        )
    my = mysql_insert(table).values(rows)
    return my.on_duplicate_key_update(**set_(my.inserted))


async def with_retry(fn: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
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


# Counters, one at a time -------------------------------------------------------------------------


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
    now = utcnow()
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


async def record_daily(
    session: AsyncSession, tenant_id: uuid.UUID, metric: Metric, delta: int, level: int
) -> None:
    """Update the day's figure of ``metric`` after a change of ``delta`` (now at ``level``)."""
    t = _DAILY
    day = utcnow().date()
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


async def read_counters(
    session: AsyncSession, tenant_id: uuid.UUID, period_start: dt.datetime
) -> list[tuple[str, int, int]]:
    """``(metric, used, version)`` of every counter of one tenant and period."""
    t = _COUNTERS
    rows = await session.execute(
        select(t.c.metric, t.c.used, t.c.version).where(
            t.c.tenant_id == tenant_id, t.c.period_start == period_start
        )
    )
    return [(str(r.metric), int(r.used), int(r.version)) for r in rows]


# Counters, a batch at once -----------------------------------------------------------------------


@dataclass
class Group:
    """Settlements of one tenant, metric and period, written together."""

    billing: TenantBilling
    metric: Metric
    tag: str
    period_start: dt.datetime
    amount: int = 0
    #: The reservations (Redis members) the write settles.
    members: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[uuid.UUID, str, str]:
        """Which counter row this group adds to."""
        return (self.billing.tenant_id, self.metric.value, period_tag(self.period_start))


async def write_groups(session: AsyncSession, groups: list[Group]) -> list[tuple[int, int] | None]:
    """A batch's counters and daily figures in at most five statements, however many tenants
    it holds (a statement per tenant made each batch's cost grow with the number of active
    tenants, and with it the latency of the searches sharing the process).

    Returns:
        ``(used, version)`` per group, in order; None for a tenant deleted since its work was
        done (nobody is left to bill, and its rows would break the foreign key).
    """
    if not groups:
        return []
    now = utcnow()
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
            figures[(row.tenant_id, row.metric, period_tag(row.period_start))] = (
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
                    "value": figures[g.key][0] if level else g.amount,
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
    return [figures[g.key] if g.billing.tenant_id in live else None for g in groups]


# Accounts and periods ----------------------------------------------------------------------------


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
    now = now or utcnow()
    anchor = anchor_of(tenant.created_at or now)
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


async def tenants_without_account(session: AsyncSession, limit: int) -> list[uuid.UUID]:
    """Up to ``limit`` tenants (any, not being deleted) that have no billing account yet.

    Across tenants on purpose: beat opens the accounts of every tenant (see
    ``billing.tasks.roll_periods``).
    """
    rows = await session.execute(
        select(Tenant.id)
        .outerjoin(BillingAccount, BillingAccount.tenant_id == Tenant.id)
        .where(BillingAccount.tenant_id.is_(None), Tenant.status != TenantStatus.deleting)
        .limit(limit)
    )
    return list(rows.scalars())


async def accounts_due(session: AsyncSession, now: dt.datetime, limit: int) -> list[BillingAccount]:
    """Up to ``limit`` billing accounts (any tenant) whose period ended by ``now``, the
    longest ended first. Across tenants on purpose: beat rolls every tenant's period over."""
    rows = await session.execute(
        select(BillingAccount)
        .where(BillingAccount.period_end <= now)
        .order_by(BillingAccount.period_end)
        .limit(limit)
    )
    return list(rows.scalars())


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
    """Read (creating or rolling over as needed) the tenant's billing snapshot.

    Raises:
        NotFound: when the tenant does not exist or is being deleted.
    """
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
    return apply_overrides(dict(catalog.get(row.plan).limits), row.overrides or {})


# Usage warnings ----------------------------------------------------------------------------------


async def record_alerts(
    session: AsyncSession,
    billing: TenantBilling,
    metric: Metric,
    crossed: list[int],
    now: dt.datetime,
) -> bool:
    """Record that ``metric`` crossed the ``crossed`` thresholds this period.

    Returns:
        Whether the highest threshold was recorded by this call (the warning is new).
    """
    top, fresh = max(crossed), False
    for threshold in sorted(crossed, reverse=True):
        result = await session.execute(
            _insert_ignore(session, _ALERTS).values(
                tenant_id=billing.tenant_id,
                metric=metric.value,
                period_start=billing.period.start,
                threshold=threshold,
                created_at=now,
            )
        )
        if threshold == top:
            fresh = bool(result.rowcount)  # type: ignore[attr-defined]
    return fresh


async def admin_emails(session: AsyncSession, tenant_id: uuid.UUID) -> list[str]:
    """The addresses of the tenant's active owners and admins, sorted."""
    rows = await session.execute(
        select(_USERS.c.email)
        .join(Membership, Membership.user_id == _USERS.c.id)
        .where(
            Membership.tenant_id == tenant_id,
            Membership.role.in_([Role.owner, Role.admin]),
            _USERS.c.is_active.is_(True),
        )
        .order_by(User.email)
    )
    return list(rows.scalars())
