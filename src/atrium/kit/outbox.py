"""The relay of the job outbox, and the once-only check of a job's consumer.

:func:`atrium.kit.enqueue.enqueue` writes each job to ``job_outbox`` in the transaction of the
work that asked for it; the request publishes it right after commit and deletes the row. A
row still there :data:`GRACE_SECONDS` later was not published (the broker was unreachable,
the process died between commit and publish) or not deleted: the relay, a beat task every
``ATRIUM_CELERY_RELAY_INTERVAL_SECONDS``, publishes it under the same task id and deletes it.

Relays of several workers do not publish the same row: on MySQL/MariaDB each takes its rows
with ``SELECT ... FOR UPDATE SKIP LOCKED``; on SQLite a relay's transaction holds the database's
write lock. A job can still arrive twice (published, then the delete failed or the process
died before it): every task is idempotent, and :func:`first_delivery` lets a task whose
effect cannot be undone (mail) act once per task id.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import structlog
from celery import Task
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from atrium.kit import runtime
from atrium.kit.celery_app import get_celery
from atrium.kit.db import unit_of_work
from atrium.kit.enqueue import Job, delete_sent, publish
from atrium.models.base import utcnow
from atrium.models.outbox import OutboxJob

# A task module: imported by the worker only (atrium.worker lists it).
celery_app = get_celery()

log = structlog.get_logger("atrium.kit.outbox")

RELAY_TASK = "atrium.outbox.relay"
#: A row younger than this may still be in its request's hands (publishing, or about to delete
#: it): longer than a publication may take (three tries, socket time-outs of 5-10 s).
GRACE_SECONDS = 30
#: Rows published per transaction.
BATCH = 100
#: How long a job's task id is remembered by :func:`first_delivery`: far longer than a
#: duplicate can take to arrive (one relay tick after the grace, or the end of an outage).
DELIVERY_TTL_SECONDS = 7 * 24 * 3600
DELIVERY_KEY = "atrium:job-done:{}"


def _job(row: OutboxJob, now: dt.datetime) -> Job:
    options = dict(row.options)
    countdown = options.pop("countdown", None)
    if countdown is not None:
        # The wait counts from the enqueue, not from this late publication.
        remaining = float(countdown) - (now - row.created_at).total_seconds()
        if remaining > 0:
            options["countdown"] = remaining
    return Job(row.task, dict(row.kwargs), options, row.id)


async def relay(
    sessionmaker: async_sessionmaker[AsyncSession], *, grace: float = GRACE_SECONDS
) -> dict[str, int]:
    """Publish the outbox rows older than ``grace`` seconds and delete them.

    Stops at the first job the broker does not take (it is down: the next tick tries again).

    Returns:
        ``published`` and ``left`` (rows the broker did not take).
    """
    counts = {"published": 0, "left": 0}
    while True:
        async with unit_of_work(sessionmaker) as session:
            now = utcnow()
            rows = list(
                await session.scalars(
                    select(OutboxJob)
                    .where(OutboxJob.created_at <= now - dt.timedelta(seconds=grace))
                    .order_by(OutboxJob.created_at)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            if not rows:
                break
            sent, error = await asyncio.to_thread(
                publish, celery_app, [_job(row, now) for row in rows]
            )
            await delete_sent(session, sent)
            if error is not None:
                rows[len(sent)].attempts += 1
        counts["published"] += len(sent)
        if error is not None:
            counts["left"] = len(rows) - len(sent)
            log.warning(
                "jobs_not_sent",
                count=counts["left"],
                source="relay",
                error=f"{type(error).__name__}: {error}",
            )
            break
        if len(rows) < BATCH:
            break
    if counts["published"]:
        log.info("outbox_relayed", published=counts["published"])
    return counts


@celery_app.task(name=RELAY_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
def relay_task() -> dict[str, int]:
    """Beat task: publish the jobs their request could not (see :func:`relay`)."""

    async def _run() -> dict[str, int]:
        res = await runtime.resources()
        return await relay(res.sessionmaker)

    return runtime.run(_run())


def first_delivery(task: Task) -> bool:
    """Whether this delivery of ``task`` is the first of its task id (call it before acting).

    A job the outbox published twice arrives twice with the same task id; the first delivery
    claims the id in Redis (``SET NX`` on ``atrium:job-done:<task id>``), a second finds it
    taken. A retry of the task (same id, ``retries > 0``) or a message the broker handed out
    again because its worker died (``redelivered``) is the same delivery going on: it acts.
    """
    request = task.request
    if not request.id or request.retries:
        return True
    delivery: dict[str, Any] = request.delivery_info or {}
    if delivery.get("redelivered"):
        return True

    async def _claim() -> bool:
        res = await runtime.resources()
        key = DELIVERY_KEY.format(request.id)
        return bool(await res.redis.set(key, "1", nx=True, ex=DELIVERY_TTL_SECONDS))

    return runtime.run(_claim())
