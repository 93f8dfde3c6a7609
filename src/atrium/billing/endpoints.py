"""Routes: the public plan list, plan administration (superusers), a tenant's usage."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request

from atrium.audit.service import Origin
from atrium.auth.dependencies import SuperUser, require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.billing import schemas, service
from atrium.billing.quota import Quota
from atrium.kit.db import DBSession
from atrium.kit.ratelimit import rate_limit
from atrium.kit.responses import SUPERUSER, TENANT, errors

router = APIRouter(tags=["plans and usage"])


async def get_quota(request: Request) -> Quota:
    """The quota engine of this app."""
    return Quota.of(request)


QuotaDep = Annotated[Quota, Depends(get_quota)]


@router.get(
    "/plans",
    response_model=schemas.PlanCatalog,
    summary="List plans",
    dependencies=[Depends(rate_limit("plans", 120, 60))],
    responses=errors(429),
)
async def list_plans(quota: QuotaDep) -> schemas.PlanCatalog:
    """Every plan with its limits (public; ``null`` limits are unlimited)."""
    return service.catalog_schema(quota.catalog)


@router.get(
    "/admin/tenants/{tenant_id}/plan",
    response_model=schemas.TenantPlan,
    summary="Get a tenant's plan (superuser)",
    responses=SUPERUSER | errors(404),
)
async def get_tenant_plan(
    tenant_id: uuid.UUID, session: DBSession, superuser: SuperUser
) -> schemas.TenantPlan:
    """A tenant's plan, its limit overrides, the limits in force and its billing period."""
    return await service.get_tenant_plan(session, tenant_id)


@router.put(
    "/admin/tenants/{tenant_id}/plan",
    response_model=schemas.TenantPlan,
    summary="Change a tenant's plan and limit overrides (superuser)",
    responses=SUPERUSER | errors(404),
)
async def put_tenant_plan(
    tenant_id: uuid.UUID,
    data: schemas.TenantPlanUpdate,
    request: Request,
    session: DBSession,
    superuser: SuperUser,
    quota: QuotaDep,
    background: BackgroundTasks,
) -> schemas.TenantPlan:
    """Put the tenant on ``plan``; ``overrides`` (when given) replace its per-tenant limits.

    Takes effect on the next request (usage already recorded is kept). Audited as
    ``billing.plan_changed`` with the values before and after.
    """
    result = await service.change_plan(
        session, quota, tenant_id, data, actor_user_id=superuser.user.id, origin=Origin.of(request)
    )
    # Again once the change is committed (background tasks run after the response).
    background.add_task(quota.forget_billing, tenant_id)
    return result


@router.get(
    "/tenants/{tenant_id}/usage",
    response_model=schemas.Usage,
    summary="Usage this period",
    responses=TENANT,
)
async def get_usage(
    tenant_id: uuid.UUID,
    quota: QuotaDep,
    subject: AuthSubject = Depends(require(Permission.usage_read)),
) -> schemas.Usage:
    """Per metric: ``used``, ``reserved`` (work in progress), ``limit``, ``percent`` and
    ``resets_at`` (the end of the billing period; null for levels such as documents)."""
    return await service.usage(quota, subject.tenant_id)


@router.get(
    "/tenants/{tenant_id}/usage/history",
    response_model=schemas.UsageHistory,
    summary="Daily usage",
    responses=TENANT,
)
async def get_usage_history(
    tenant_id: uuid.UUID,
    session: DBSession,
    quota: QuotaDep,
    days: int = Query(90, ge=1, le=366, description="How many days back, today included."),
    subject: AuthSubject = Depends(require(Permission.usage_read)),
) -> schemas.UsageHistory:
    """One entry per day, oldest first: what each day consumed (monthly metrics) and the
    level at the end of each day (levels)."""
    # This process's queued settlements first, so a caller sees its own work counted.
    await quota.flush()
    return await service.usage_history(session, subject.tenant_id, days)
