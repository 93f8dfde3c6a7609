"""Usage warnings: recorded once per threshold, mailed to owners and admins through the job
outbox (in the transaction that records the warning), so a broker outage loses no warning."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from tests.support.factories import create_tenant, create_user


async def test_warning_is_mailed_once_through_the_outbox(
    app: Any, client: Any, celery_worker: Any, mailbox: Any
) -> None:
    from atrium.billing.quota import Metric, Quota, send_usage_warning
    from atrium.models.outbox import OutboxJob

    owner = await create_user(app)
    tenant = await create_tenant(app, owner, name="Warned")
    quota = Quota.of(app)
    billing = await quota.billing(tenant.id)
    await send_usage_warning(quota, billing, Metric.searches, 80, [80], 800, 1000)
    mail = await asyncio.to_thread(mailbox.wait_for, owner.email, "80%", 60)
    assert "Warned" in mail.subject
    # The same threshold again (another process crossing it at the same time): no second job.
    await send_usage_warning(quota, billing, Metric.searches, 80, [80], 810, 1000)
    async with app.state.sessionmaker() as session:
        left = (await session.execute(select(func.count()).select_from(OutboxJob))).scalar_one()
    assert left == 0  # the one job was published and left the outbox; no second was written
    assert len([m for m in mailbox.all(owner.email) if "80%" in m.subject]) == 1
