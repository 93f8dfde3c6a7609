"""Superuser routes under ``/admin``: search users and tenants, suspend and restore tenants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func, or_, select

from atrium.accounts.schemas import User
from atrium.audit.service import Origin, record
from atrium.auth.dependencies import SuperUser
from atrium.kit.db import DBSession
from atrium.kit.errors import NotFound
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.responses import SUPERUSER, errors
from atrium.models import Tenant, TenantStatus
from atrium.models import User as UserModel
from atrium.models.accounts import user_email_col, user_id_col
from atrium.tenants.schemas import Tenant as TenantOut
from atrium.tenants.status import forget_status

router = APIRouter(prefix="/admin", tags=["admin"], responses=SUPERUSER)
PageParams = Annotated[Params, Depends()]
Search = Annotated[
    str | None, Query(max_length=200, description="Part of the e-mail address or name.")
]


def _like(q: str) -> str:
    escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@router.get("/users", response_model=Page[User])
async def list_users(
    _: SuperUser, session: DBSession, params: PageParams, q: Search = None
) -> Page[User]:
    """Every account, oldest first; ``q`` searches e-mail and name."""
    stmt = select(UserModel).order_by(UserModel.created_at, user_id_col)
    if q:
        pattern = _like(q)
        stmt = stmt.where(
            or_(
                func.lower(user_email_col).like(pattern, escape="\\"),
                func.lower(UserModel.name).like(pattern, escape="\\"),
            )
        )

    def transform(rows: Sequence[Any]) -> list[User]:
        return [User.model_validate(r) for r in rows]

    return await paginate_query(session, stmt, params, transform)


@router.get("/tenants", response_model=Page[TenantOut])
async def list_tenants(
    _: SuperUser,
    session: DBSession,
    params: PageParams,
    q: Search = None,
    status: TenantStatus | None = None,
) -> Page[TenantOut]:
    """Every tenant, oldest first; ``q`` searches the name, ``status`` filters."""
    stmt = select(Tenant).order_by(Tenant.created_at, Tenant.id)
    if q:
        stmt = stmt.where(func.lower(Tenant.name).like(_like(q), escape="\\"))
    if status is not None:
        stmt = stmt.where(Tenant.status == status)

    def transform(rows: Sequence[Any]) -> list[TenantOut]:
        return [TenantOut.model_validate(r) for r in rows]

    return await paginate_query(session, stmt, params, transform)


async def _set_status(
    session: DBSession,
    principal: Any,
    tenant_id: uuid.UUID,
    status: TenantStatus,
    request: Request,
) -> TenantOut:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None or tenant.status is TenantStatus.deleting:
        raise NotFound("Tenant not found")
    if tenant.status is not status:
        tenant.status = status
        await session.flush()
        await forget_status(request.app.state.redis, tenant.id)
        record(
            session,
            "tenant.suspended" if status is TenantStatus.suspended else "tenant.unsuspended",
            origin=Origin.of(request),
            tenant_id=tenant.id,
            actor_user_id=principal.user.id,
            target_type="tenant",
            target_id=tenant.id,
        )
    return TenantOut.model_validate(tenant)


@router.post(
    "/tenants/{tenant_id}/suspend",
    response_model=TenantOut,
    responses=errors(404),
)
async def suspend_tenant(
    tenant_id: uuid.UUID, principal: SuperUser, request: Request, session: DBSession
) -> TenantOut:
    """Suspend a tenant: its members and API keys get 403 saying so until it is restored."""
    return await _set_status(session, principal, tenant_id, TenantStatus.suspended, request)


@router.post(
    "/tenants/{tenant_id}/unsuspend",
    response_model=TenantOut,
    responses=errors(404),
)
async def unsuspend_tenant(
    tenant_id: uuid.UUID, principal: SuperUser, request: Request, session: DBSession
) -> TenantOut:
    """Restore a suspended tenant."""
    return await _set_status(session, principal, tenant_id, TenantStatus.active, request)
