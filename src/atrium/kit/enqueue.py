"""Enqueue after commit: jobs asked for inside a transaction leave only once it committed.

A job sent before commit could run against rows that do not exist yet (or never will, if the
transaction rolls back); a job sent after a rollback would act on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

_KEY = "atrium_pending_jobs"


@dataclass(frozen=True)
class Job:
    """A Celery task to send: its registered name, keyword arguments and options."""

    name: str
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


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

    Args:
        session: the unit of work the job belongs to.
        name: the task's registered name, e.g. ``"atrium.ping"``.
        countdown: seconds to wait before the task may run.
        queue: the Celery queue, when not the default.
        **kwargs: JSON-serialisable task arguments (tenant tasks take ``tenant_id``).
    """
    options: dict[str, Any] = {}
    if countdown is not None:
        options["countdown"] = countdown
    if queue is not None:
        options["queue"] = queue
    session.info.setdefault(_KEY, []).append(Job(name, kwargs, options))


def pending_jobs(session: AsyncSession) -> list[Job]:
    """The jobs waiting for this session's commit."""
    return list(session.info.get(_KEY, []))


def discard_jobs(session: AsyncSession) -> None:
    """Forget the jobs of a rolled-back unit of work."""
    session.info.pop(_KEY, None)


async def send_jobs(session: AsyncSession) -> list[str]:
    """Send the jobs of a committed unit of work; returns the Celery task ids."""
    jobs: list[Job] = session.info.pop(_KEY, [])
    if not jobs:
        return []
    from atrium.worker import celery_app

    def _send() -> list[str]:
        return [celery_app.send_task(job.name, kwargs=job.kwargs, **job.options).id for job in jobs]

    # Publishing talks to the broker over a blocking socket: keep it off the event loop.
    return await run_in_threadpool(_send)
