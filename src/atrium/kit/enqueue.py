"""Enqueue through a transactional outbox: a job asked for inside a transaction is written to
the ``job_outbox`` table by that transaction, and leaves for the broker once it committed.

A job sent before commit could run against rows that do not exist yet (or never will, if the
transaction rolls back); a job sent after a rollback would act on nothing. A job kept only in
memory until commit would be lost if the broker were unreachable at that moment (a document
left ``queued``, a verification mail never sent). So the row commits atomically with the work;
right after commit :func:`send_jobs` publishes the jobs and deletes their rows, and whatever it
could not publish is published later by the relay (:mod:`atrium.kit.outbox`).

Each job's Celery task id is its outbox row's id: a job published twice (published, then the
delete failed) arrives twice with the same id, which a consumer that must act once (mail) checks.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from celery import Celery
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.concurrency import run_in_threadpool

from atrium.kit.celery_app import get_celery
from atrium.kit.engine import write_session
from atrium.models.outbox import OutboxJob

log = structlog.get_logger("atrium.kit.enqueue")

_KEY = "atrium_pending_jobs"

#: How a publication retries against a broker that refuses it: three tries within a second,
#: then the job waits in the outbox for the relay. Kombu's default policy is similar but a
#: request must not wait on the broker at all beyond this (the socket time-outs of
#: ``broker_transport_options`` bound a broker that accepts the connection and then hangs).
PUBLISH_RETRY_POLICY: dict[str, float] = {
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.3,
    "interval_max": 0.5,
}


@dataclass(frozen=True)
class Job:
    """A Celery task to send: its registered name, keyword arguments, options and task id."""

    name: str
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    id: uuid.UUID = field(default_factory=uuid.uuid4)


def enqueue(
    session: AsyncSession,
    name: str,
    /,
    *,
    countdown: float | None = None,
    queue: str | None = None,
    **kwargs: Any,
) -> None:
    """Ask for ``name(**kwargs)`` to run once ``session`` commits.

    The job is added to ``session`` as an outbox row: it commits, or rolls back, with the work.

    Args:
        session: the unit of work the job belongs to.
        name: the task's registered name, e.g. ``"atrium.ping"``.
        countdown: seconds to wait before the task may run (counted from the enqueue).
        queue: the Celery queue, when not the default.
        **kwargs: JSON-serialisable task arguments (tenant tasks take ``tenant_id``).
    """
    options: dict[str, Any] = {}
    if countdown is not None:
        options["countdown"] = countdown
    if queue is not None:
        options["queue"] = queue
    job = Job(name, kwargs, options)
    session.add(OutboxJob(id=job.id, task=name, kwargs=kwargs, options=options, attempts=0))
    session.info.setdefault(_KEY, []).append(job)


def pending_jobs(session: AsyncSession) -> list[Job]:
    """The jobs waiting for this session's commit."""
    return list(session.info.get(_KEY, []))


def discard_jobs(session: AsyncSession) -> None:
    """Forget the jobs of a rolled-back unit of work (their rows rolled back with it)."""
    session.info.pop(_KEY, None)


def publish(celery_app: Celery, jobs: Sequence[Job]) -> tuple[list[uuid.UUID], Exception | None]:
    """Publish ``jobs`` in order, each with its id as the task id; blocking (broker socket).

    Stops at the first job the broker does not take: the rest stay for the relay.

    Returns:
        The ids published, and the error that stopped the publication (``None``: all sent).
    """
    sent: list[uuid.UUID] = []
    for job in jobs:
        try:
            _send(celery_app, job)
        except Exception as exc:  # any failure: the job stays in the outbox, nothing is lost
            return sent, exc
        sent.append(job.id)
    return sent, None


def _send(celery_app: Celery, job: Job) -> None:
    celery_app.send_task(
        job.name,
        kwargs=job.kwargs,
        task_id=str(job.id),
        # Nobody waits for these results; without this, each publication would also
        # subscribe to its result channel on the result backend, which retries an
        # unreachable Redis for many seconds.
        ignore_result=True,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        **job.options,
    )


def send_now(name: str, /, **kwargs: Any) -> None:
    """Publish ``name(**kwargs)`` right away, outside any transaction; blocking (broker socket).

    For best-effort jobs that belong to no unit of work (a key's last-used mark): no outbox
    row, so a job the broker does not take is lost, and the caller hears of it.

    Args:
        name: the task's registered name.
        **kwargs: JSON-serialisable task arguments.

    Raises:
        Exception: whatever the broker's client raised after the short retries of
            :data:`PUBLISH_RETRY_POLICY`.
    """
    _send(get_celery(), Job(name, kwargs))


async def delete_sent(session: AsyncSession, ids: Sequence[uuid.UUID]) -> None:
    """Delete the outbox rows of published jobs (the caller commits)."""
    if ids:
        await session.execute(delete(OutboxJob).where(OutboxJob.id.in_(list(ids))))


async def send_jobs(
    session: AsyncSession, sessionmaker: async_sessionmaker[AsyncSession] | None = None
) -> list[str]:
    """Publish the jobs of a committed unit of work and delete their outbox rows.

    Never raises: the work is committed, and a job the broker did not take stays in the
    outbox for the relay (logged as ``jobs_not_sent``); a row whose delete failed makes the
    relay publish its job again, with the same task id.

    Args:
        session: the committed session whose jobs to send.
        sessionmaker: where the short transaction that deletes the rows gets its session
            (default: a session on ``session``'s engine).

    Returns:
        The task ids published.
    """
    jobs: list[Job] = session.info.pop(_KEY, [])
    if not jobs:
        return []
    # Publishing talks to the broker over a blocking socket: keep it off the event loop.
    sent, error = await run_in_threadpool(publish, get_celery(), jobs)
    if error is not None:
        log.warning(
            "jobs_not_sent",
            count=len(jobs) - len(sent),
            tasks=sorted({job.name for job in jobs[len(sent) :]}),
            error=f"{type(error).__name__}: {error}",
        )
    if sent:
        maker = sessionmaker or async_sessionmaker(session.bind, expire_on_commit=False)
        try:
            async with write_session(maker) as cleanup:
                await delete_sent(cleanup, sent)
                await cleanup.commit()
        except Exception:
            # Published but still in the outbox: the relay publishes them again under the same
            # task ids; the jobs are idempotent, and mail is sent once per task id.
            log.warning("outbox_cleanup_failed", count=len(sent), exc_info=True)
    return [str(i) for i in sent]
