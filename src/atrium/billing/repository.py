"""SQL of the billing service's reads: a tenant's plan row and its daily usage history.

The quota engine's own SQL (counters, billing accounts, periods, alerts) is in
``billing/quota/repository.py``; this module serves ``billing/service.py`` only.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.repository import TenantRepository
from atrium.models import Tenant
from atrium.models.billing import UsageDaily


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant row (its plan), whatever its status."""
    return await session.get(Tenant, tenant_id)


class UsageDailyRepository(TenantRepository[UsageDaily]):
    """One tenant's daily usage figures."""

    model = UsageDaily

    async def since(self, first: dt.date) -> dict[tuple[str, dt.date], int]:
        """Every figure from ``first`` on, by ``(metric, day)``."""
        rows = (
            await self.session.execute(
                self.select(UsageDaily.metric, UsageDaily.day, UsageDaily.value).where(
                    UsageDaily.day >= first
                )
            )
        ).all()
        return {(r.metric, r.day): int(r.value) for r in rows}

    async def last_before(self, metric: str, first: dt.date) -> int:
        """The latest figure of ``metric`` recorded before ``first`` (0 when none)."""
        value = (
            await self.session.execute(
                self.select(UsageDaily.value)
                .where(UsageDaily.metric == metric, UsageDaily.day < first)
                .order_by(UsageDaily.day.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        return int(value or 0)
