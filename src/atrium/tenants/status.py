"""A tenant's status as the rest of Atrium sees it: whether work in it is allowed, and the few
seconds for which API-key authentication may remember it.

The tenants domain owns the status; authentication (people and API keys alike) only reads it
here, so neither ``auth`` nor ``apikeys`` needs the other to ask whether a tenant is usable.
"""

from __future__ import annotations

import uuid
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.errors import Forbidden, NotFound
from atrium.models import TenantStatus
from atrium.tenants.repository import tenant_status

#: How long a tenant's status is remembered by API-key authentication: suspending a tenant
#: reaches its keys within this many seconds, or at once through :func:`forget_status`.
STATUS_TTL_SECONDS = 10


def ensure_tenant_usable(status: TenantStatus) -> None:
    """Refuse work in a suspended or departing tenant, saying why."""
    if status is TenantStatus.suspended:
        raise Forbidden("This tenant is suspended; contact support to restore access")
    if status is TenantStatus.deleting:
        raise NotFound("Tenant not found")


def status_cache_key(tenant_id: uuid.UUID | str) -> str:
    """Redis key of a tenant's cached status."""
    return f"atrium:t:{tenant_id}:status"


async def load_status(
    session: AsyncSession | None, sessionmaker: Any, redis: Redis, tenant_id: uuid.UUID
) -> str | None:
    """Read the tenant's status and remember it for :data:`STATUS_TTL_SECONDS`.

    Args:
        session: a session to read through; None: a short one from ``sessionmaker``.
        sessionmaker: where that short session comes from.
        redis: where the status is remembered.
        tenant_id: the tenant.

    Returns:
        The status's value, or None when the tenant does not exist (nothing remembered).
    """
    if session is not None:
        status = await tenant_status(session, tenant_id)
    else:
        async with sessionmaker() as own:
            status = await tenant_status(own, tenant_id)
    if status is None:
        return None
    await redis.set(status_cache_key(tenant_id), status.value, ex=STATUS_TTL_SECONDS)
    return status.value


async def forget_status(redis: Redis, tenant_id: uuid.UUID) -> None:
    """Make a status change reach the tenant's API keys at once.

    API-key authentication caches each tenant's status for a few seconds; dropping the cached
    value makes the next request read the new one (the request commits before it answers).
    """
    await redis.delete(status_cache_key(tenant_id))
