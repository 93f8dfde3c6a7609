"""Billing services: the plan catalog, plan changes by superusers, usage figures and history,
and the tenant-route rate limit (which takes its numbers from the plan)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.audit.service import Origin, record
from atrium.auth.subject import AuthSubject
from atrium.billing import repository, schemas
from atrium.billing.plans import Limit, PlanCatalog, get_catalog, largest_upload
from atrium.billing.quota import Metric, Quota, ensure_account, roll_period
from atrium.kit.errors import NotFound, Unprocessable
from atrium.kit.ratelimit import Bucket, RateLimitState, admit, hit, tenant_bucket
from atrium.models import Tenant, utcnow


def catalog_schema(catalog: PlanCatalog | None = None) -> schemas.PlanCatalog:
    """Every plan as the public API shows it."""
    catalog = catalog or get_catalog()
    return schemas.PlanCatalog(
        default_plan=catalog.default_plan,
        plans=[
            schemas.Plan(
                name=p.name,
                title=p.title,
                description=p.description,
                price_usd_per_month=p.price_usd_per_month,
                limits=schemas.PlanLimits.of(p.limits),
            )
            for p in catalog.plans.values()
        ],
    )


async def _tenant_or_404(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await repository.get_tenant(session, tenant_id)
    if tenant is None:
        raise NotFound("Tenant not found")
    return tenant


async def get_tenant_plan(
    session: AsyncSession, tenant_id: uuid.UUID, catalog: PlanCatalog | None = None
) -> schemas.TenantPlan:
    """A tenant's plan, overrides and effective limits.

    Raises:
        NotFound: no such tenant.
    """
    catalog = catalog or get_catalog()
    tenant = await _tenant_or_404(session, tenant_id)
    account = await ensure_account(session, tenant_id)
    await roll_period(session, account, utcnow())
    overrides = dict(account.overrides or {})
    limits = dict(catalog.get(tenant.plan).limits)
    for key, value in overrides.items():
        if key in Limit.__members__:
            limits[Limit(key)] = value
    return schemas.TenantPlan(
        tenant_id=tenant_id,
        plan=tenant.plan,
        overrides=overrides,
        limits=schemas.PlanLimits.of(limits),
        period_start=account.period_start,
        period_end=account.period_end,
    )


async def change_plan(
    session: AsyncSession,
    quota: Quota,
    tenant_id: uuid.UUID,
    data: schemas.TenantPlanUpdate,
    *,
    actor_user_id: uuid.UUID,
    origin: Origin,
) -> schemas.TenantPlan:
    """Put a tenant on a plan and set its limit overrides (superusers only); audited.

    The cached snapshot is dropped now; the caller drops it again once the transaction
    committed, so no request can re-cache the old plan in between.

    Raises:
        NotFound: no such tenant.
        Unprocessable: unknown plan.
    """
    catalog = quota.catalog
    if data.plan not in catalog.plans:
        raise Unprocessable(
            f"Unknown plan '{data.plan}'; plans are: {', '.join(sorted(catalog.plans))}",
            detail={
                "message": f"Unknown plan '{data.plan}'",
                "plans": sorted(catalog.plans),
            },
        )
    if data.overrides is not None and Limit.max_upload_bytes in data.overrides:
        _check_upload_override(data.overrides[Limit.max_upload_bytes], catalog)
    tenant = await _tenant_or_404(session, tenant_id)
    account = await ensure_account(session, tenant_id)
    before = {"plan": tenant.plan, "overrides": dict(account.overrides or {})}
    tenant.plan = data.plan
    if data.overrides is not None:
        account.overrides = {k.value: v for k, v in data.overrides.items()}
    after = {"plan": tenant.plan, "overrides": dict(account.overrides or {})}
    record(
        session,
        "billing.plan_changed",
        origin=origin,
        tenant_id=tenant_id,
        actor_user_id=actor_user_id,
        target_type="tenant",
        target_id=tenant_id,
        data={"before": before, "after": after},
    )
    await session.flush()
    await quota.forget_billing(tenant_id)
    return await get_tenant_plan(session, tenant_id, catalog)


def _check_upload_override(value: int | None, catalog: PlanCatalog) -> None:
    """An upload limit override is a number no larger than the largest plan's: the request
    limits in front of the upload route (the app's and the proxies') are sized from that."""
    largest = largest_upload(catalog)
    if value is None or value > largest:
        raise Unprocessable(
            f"max_upload_bytes must be a number of bytes up to {largest} (the largest plan's); "
            "to allow larger documents, raise a plan's max_upload_bytes in the plans file and "
            "restart",
            detail={"message": "max_upload_bytes override out of range", "largest": largest},
        )


async def usage(quota: Quota, tenant_id: uuid.UUID) -> schemas.Usage:
    """Where the tenant stands on every metric this period."""
    billing = await quota.billing(tenant_id)
    limits = billing.limits(quota.catalog)
    figures = await quota.usage(tenant_id)
    return schemas.Usage(
        tenant_id=tenant_id,
        plan=billing.plan,
        period_start=billing.period.start,
        period_end=billing.period.end,
        metrics=[
            schemas.MetricUsage(
                metric=f.metric.value,
                kind="level" if f.metric.is_level else "monthly",
                used=f.used,
                reserved=f.reserved,
                limit=f.limit,
                percent=f.percent,
                resets_at=f.resets_at,
            )
            for f in figures
        ],
        requests_per_minute_per_key=limits[Limit.requests_per_minute_per_key],
        requests_per_minute_per_user=limits[Limit.requests_per_minute_per_user],
        max_upload_bytes=limits[Limit.max_upload_bytes],
    )


async def usage_history(
    session: AsyncSession, tenant_id: uuid.UUID, days: int
) -> schemas.UsageHistory:
    """Daily figures for the last ``days`` days (today included), oldest first.

    Monthly metrics show what each day consumed (0 on quiet days); levels show the level at
    the end of each day, carried forward over days without change.
    """
    today = utcnow().date()
    first = today - dt.timedelta(days=days - 1)
    daily = repository.UsageDailyRepository(session, tenant_id)
    by_day = await daily.since(first)
    # Where each level stood before the window opened.
    levels: dict[str, int] = {}
    for metric in Metric:
        if not metric.is_level:
            continue
        levels[metric.value] = await daily.last_before(metric.value, first)
    out: list[schemas.UsageDay] = []
    for i in range(days):
        day = first + dt.timedelta(days=i)
        values: dict[str, int] = {}
        for metric in Metric:
            value = by_day.get((metric.value, day))
            if metric.is_level:
                if value is not None:
                    levels[metric.value] = value
                values[metric.value] = levels[metric.value]
            else:
                values[metric.value] = value or 0
        out.append(schemas.UsageDay(date=day, values=values))
    return schemas.UsageHistory(tenant_id=tenant_id, days=out)


async def caller_bucket(quota: Quota, subject: AuthSubject) -> Bucket | None:
    """The per-minute bucket a tenant-route request of ``subject`` counts against.

    API keys use their own ``rate_limit_per_minute`` when set, capped at the plan's per-key
    limit, else the plan's per-key limit; people use the plan's per-user limit. Each key and
    each user has its own bucket. None: the plan sets no limit.
    """
    limits = await quota.limits(subject.tenant_id)
    if subject.kind == "api_key":
        kind, who = "key", subject.api_key_id
        plan_limit = limits[Limit.requests_per_minute_per_key]
        own = subject.rate_limit_per_minute
        # A key's own limit may only lower the plan's: creation refuses more, and this cap
        # holds when the plan was lowered after the key was made.
        per_minute = (
            plan_limit if own is None else own if plan_limit is None else min(own, plan_limit)
        )
    else:
        kind, who = "user", subject.user_id
        per_minute = limits[Limit.requests_per_minute_per_user]
    return tenant_bucket(
        tenant_id=subject.tenant_id, kind=kind, subject_id=str(who), per_minute=per_minute
    )


async def enforce_tenant_rate_limit(
    quota: Quota, subject: AuthSubject, states: list[RateLimitState]
) -> None:
    """Count a tenant-route request against the caller's per-minute limit (:func:`caller_bucket`).

    Args:
        quota: the quota engine (the plan's limits, its Redis client).
        subject: the caller.
        states: the request's limit outcomes, reported in its ``X-RateLimit-*`` headers.

    Raises:
        TooManyRequests: over the limit (429 with ``Retry-After`` and ``X-RateLimit-*``).
    """
    bucket = await caller_bucket(quota, subject)
    if bucket is not None:
        # A refusal is counted in atrium_rate_limit_rejections_total by kit.ratelimit.
        state = await hit(quota.redis, bucket)
        admit(state, states, tenant_id=str(subject.tenant_id), subject=subject.principal)
