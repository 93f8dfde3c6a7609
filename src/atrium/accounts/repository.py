"""SQL of the data export's reads (``accounts/exports.py``): a person's memberships and the
rows of a tenant they own.

Module functions, not a :class:`atrium.kit.repository.TenantRepository`: the memberships cross
tenants (they are the person's, scoped to the user), and the export reads every tenant-owned
table generically, as the Core tables of ``Base.metadata`` (so it keeps up as domains add
tables), where the base knows a mapped model. The rest of ``accounts`` is about one account,
never about a tenant's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.models import Membership, Tenant


async def memberships_of(
    session: AsyncSession, user_id: uuid.UUID
) -> Sequence[Row[tuple[Membership, Tenant]]]:
    """Every membership of ``user_id`` with its tenant (whatever its status), oldest tenant
    first."""
    result = await session.execute(
        select(Membership, Tenant)
        .join(Tenant, Tenant.id == Membership.tenant_id)
        .where(Membership.user_id == user_id)
        .order_by(Tenant.created_at)
    )
    return result.all()


async def tenant_rows(
    session: AsyncSession, table: Table, columns: Sequence[Any], tenant_id: uuid.UUID
) -> Sequence[Row[Any]]:
    """``columns`` of the rows of ``table`` (a table with a ``tenant_id`` column) that belong
    to ``tenant_id``."""
    result = await session.execute(select(*columns).where(table.c.tenant_id == tenant_id))
    return result.all()
