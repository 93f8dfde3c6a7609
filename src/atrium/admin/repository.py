"""SQL of the superuser routes: every account and every tenant, searched and filtered.

The one place that reads across tenants on purpose: only superusers reach it.
"""

from __future__ import annotations

import uuid

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.models import Tenant, TenantStatus, User
from atrium.models.accounts import user_email_col, user_id_col


def _like(q: str) -> str:
    escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def users_query(q: str | None = None) -> Select[tuple[User]]:
    """Every account, oldest first; ``q`` (when given) is part of the e-mail address or name."""
    stmt = select(User).order_by(User.created_at, user_id_col)
    if q:
        pattern = _like(q)
        stmt = stmt.where(
            or_(
                func.lower(user_email_col).like(pattern, escape="\\"),
                func.lower(User.name).like(pattern, escape="\\"),
            )
        )
    return stmt


def tenants_query(
    q: str | None = None, status: TenantStatus | None = None
) -> Select[tuple[Tenant]]:
    """Every tenant, oldest first; ``q`` is part of the name, ``status`` filters."""
    stmt = select(Tenant).order_by(Tenant.created_at, Tenant.id)
    if q:
        stmt = stmt.where(func.lower(Tenant.name).like(_like(q), escape="\\"))
    if status is not None:
        stmt = stmt.where(Tenant.status == status)
    return stmt


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant row, whatever its status."""
    return await session.get(Tenant, tenant_id)
