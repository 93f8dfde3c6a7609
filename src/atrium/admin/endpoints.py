"""Superuser routes under ``/admin``: search users and tenants, suspend and restore tenants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from atrium.accounts.schemas import User
from atrium.admin import repository, service
from atrium.auth.dependencies import SuperUser
from atrium.context import Ctx
from atrium.kit.db import DBSession
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.responses import SUPERUSER, errors
from atrium.models import TenantStatus
from atrium.tenants.schemas import Tenant as TenantOut

router = APIRouter(prefix="/admin", tags=["admin"], responses=SUPERUSER)
PageParams = Annotated[Params, Depends()]
Search = Annotated[
    str | None, Query(max_length=200, description="Part of the e-mail address or name.")
]


@router.get("/users", response_model=Page[User])
async def list_users(
    _: SuperUser, session: DBSession, params: PageParams, q: Search = None
) -> Page[User]:
    """Every account, oldest first; ``q`` searches e-mail and name."""

    def transform(rows: Sequence[Any]) -> list[User]:
        return [User.model_validate(r) for r in rows]

    return await paginate_query(session, repository.users_query(q), params, transform)


@router.get("/tenants", response_model=Page[TenantOut])
async def list_tenants(
    _: SuperUser,
    session: DBSession,
    params: PageParams,
    q: Search = None,
    status: TenantStatus | None = None,
) -> Page[TenantOut]:
    """Every tenant, oldest first; ``q`` searches the name, ``status`` filters."""

    def transform(rows: Sequence[Any]) -> list[TenantOut]:
        return [TenantOut.model_validate(r) for r in rows]

    return await paginate_query(session, repository.tenants_query(q, status), params, transform)


@router.post(
    "/tenants/{tenant_id}/suspend",
    response_model=TenantOut,
    responses=errors(404),
)
async def suspend_tenant(tenant_id: uuid.UUID, principal: SuperUser, ctx: Ctx) -> TenantOut:
    """Suspend a tenant: its members and API keys get 403 saying so until it is restored."""
    tenant = await service.set_tenant_status(
        ctx, tenant_id, TenantStatus.suspended, actor_user_id=principal.user.id
    )
    return TenantOut.model_validate(tenant)


@router.post(
    "/tenants/{tenant_id}/unsuspend",
    response_model=TenantOut,
    responses=errors(404),
)
async def unsuspend_tenant(tenant_id: uuid.UUID, principal: SuperUser, ctx: Ctx) -> TenantOut:
    """Restore a suspended tenant."""
    tenant = await service.set_tenant_status(
        ctx, tenant_id, TenantStatus.active, actor_user_id=principal.user.id
    )
    return TenantOut.model_validate(tenant)
