"""Celery tasks of the API key domain."""

from __future__ import annotations

import datetime as dt
import uuid

from atrium.apikeys.repository import ApiKeyRepository
from atrium.kit import runtime
from atrium.kit.db import unit_of_work
from atrium.worker import celery_app


@celery_app.task(name="atrium.apikeys.record_last_used", ignore_result=True)
def record_last_used(*, tenant_id: str, key_id: str, used_at: str) -> bool:
    """Move a key's ``last_used_at`` forward to ``used_at``.

    Sent by authentication at most once a minute per key (see ``auth.api_keys``);
    idempotent and never moves the time backwards, so retries and reordering are harmless.

    Args:
        tenant_id: the key's tenant (required, like every tenant task).
        key_id: the key.
        used_at: ISO 8601 time of the use.
    """
    tenant = uuid.UUID(tenant_id)
    key = uuid.UUID(key_id)
    when = dt.datetime.fromisoformat(used_at)
    if when.tzinfo is None:
        raise ValueError("used_at must carry a time zone")

    async def _write() -> bool:
        res = await runtime.resources()
        async with unit_of_work(res.sessionmaker) as session:
            return await ApiKeyRepository(session, tenant).record_last_used(key, when)

    return runtime.run(_write())
