"""Usage warnings: mailed to a tenant's owners and admins when a metric reaches 80 % and 100 %
of its limit, once per tenant, metric, period and threshold."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.quota import repository
from atrium.billing.quota.metrics import Metric
from atrium.billing.quota.periods import hash_ttl_ms, period_tag, utcnow
from atrium.billing.quota.snapshot import TenantBilling, alerts_key
from atrium.kit.db import write_session
from atrium.kit.enqueue import enqueue, send_jobs

if TYPE_CHECKING:
    from atrium.billing.quota.engine import Quota

log = structlog.get_logger("atrium.billing.quota")

#: Usage warnings are mailed when a metric reaches these percentages of its limit.
ALERT_THRESHOLDS = (80, 100)


async def maybe_alert(quota: Quota, billing: TenantBilling, metric: Metric, used: int) -> None:
    """Warn the tenant if ``used`` crossed a threshold not warned about yet. Never raises."""
    limit = billing.limit(quota.catalog, metric.limit)
    if not limit:
        return
    crossed = [t for t in ALERT_THRESHOLDS if used * 100 >= t * limit]
    if not crossed:
        return
    top = max(crossed)
    key = alerts_key(billing.tenant_id, period_tag(billing.period.start))
    # Fast path: most settles past 80% find the warning handled and stop here.
    if not await quota.redis.sadd(key, f"{metric}:{top}"):
        return
    await quota.redis.expire(key, hash_ttl_ms(billing.period, Metric.searches) // 1000)
    try:
        await send_usage_warning(quota, billing, metric, top, crossed, used, limit)
    except Exception:
        # A warning mail must never fail the work it reports on.
        log.exception("usage_warning_failed", tenant_id=str(billing.tenant_id), metric=metric)


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
    now = utcnow()
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
            fresh = await repository.record_alerts(session, billing, metric, crossed, now)
            recipients = await repository.admin_emails(session, billing.tenant_id) if fresh else []
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

    recipients, committed = await repository.with_retry(write)
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
