"""Tenant purge: the one place that removes everything a tenant owns, everywhere.

Order matters: the row is marked ``deleting`` first (its members and keys get 404 from then on),
external data goes next (vector partition, blobs, Redis keys), and the row itself last, so a
crash part-way leaves a ``deleting`` tenant whose purge simply runs again (every step is
idempotent; the task retries and is acknowledged late).
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from redis.asyncio import Redis

from atrium.kit import runtime
from atrium.kit.blobstore import get_blobstore, tenant_prefix
from atrium.kit.db import unit_of_work
from atrium.kit.vectordb import drop_tenant_partition
from atrium.models import TenantStatus
from atrium.tenants.repository import delete_tenant, get_tenant
from atrium.worker import celery_app

log = structlog.get_logger("atrium.tenants.purge")


async def delete_redis_keys(redis: Redis, tenant_id: uuid.UUID) -> int:
    """Delete every Redis key that names the tenant (the convention for tenant-scoped keys)."""
    deleted = 0
    batch: list[str] = []
    async for key in redis.scan_iter(match=f"*{tenant_id}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(await redis.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(await redis.delete(*batch))
    return deleted


async def purge_tenant(tenant_id: uuid.UUID) -> dict[str, Any]:
    """Remove the tenant's rows, vector partition, stored files and cache keys."""
    res = await runtime.resources()
    async with unit_of_work(res.sessionmaker) as session:
        tenant = await get_tenant(session, tenant_id)
        if tenant is not None and tenant.status is not TenantStatus.deleting:
            tenant.status = TenantStatus.deleting
    async with res.vector_pool.connection() as conn:
        partition = await drop_tenant_partition(conn, tenant_id)
    blobs = await get_blobstore(res.settings).delete_prefix(tenant_prefix(tenant_id))
    keys = await delete_redis_keys(res.redis, tenant_id)
    async with unit_of_work(res.sessionmaker) as session:
        rows = await delete_tenant(session, tenant_id)
    summary = {
        "tenant_id": str(tenant_id),
        "tenant_row": rows,
        "partition_dropped": partition,
        "blobs": blobs,
        "redis_keys": keys,
    }
    log.info("tenant_purged", **summary)
    return summary


@celery_app.task(
    name="atrium.tenants.purge",
    autoretry_for=(OSError, ConnectionError),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=8,
)
def purge(*, tenant_id: str) -> dict[str, Any]:
    """Purge a tenant everywhere (idempotent; safe to run again after a crash)."""
    return runtime.run(purge_tenant(uuid.UUID(tenant_id)))
