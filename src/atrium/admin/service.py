"""What superusers do to tenants besides their plan (``billing.service.change_plan``)."""

from __future__ import annotations

import uuid

from atrium.admin import repository
from atrium.audit.service import record
from atrium.context import ServiceContext
from atrium.kit.errors import NotFound
from atrium.models import Tenant, TenantStatus
from atrium.tenants.status import forget_status


async def set_tenant_status(
    ctx: ServiceContext, tenant_id: uuid.UUID, status: TenantStatus, *, actor_user_id: uuid.UUID
) -> Tenant:
    """Suspend (``suspended``) or restore (``active``) a tenant; audited when it changes.

    The tenant's cached status is dropped at once, so its members and keys see the change on
    their next request.

    Raises:
        NotFound: no such tenant, or it is being deleted.
    """
    session = ctx.session
    tenant = await repository.get_tenant(session, tenant_id)
    if tenant is None or tenant.status is TenantStatus.deleting:
        raise NotFound("Tenant not found")
    if tenant.status is not status:
        tenant.status = status
        await session.flush()
        await forget_status(ctx.redis, tenant.id)
        record(
            session,
            "tenant.suspended" if status is TenantStatus.suspended else "tenant.unsuspended",
            origin=ctx.origin,
            tenant_id=tenant.id,
            actor_user_id=actor_user_id,
            target_type="tenant",
            target_id=tenant.id,
        )
    return tenant
