"""The account database: the unit of work (a request's, a task's) over the sessions of
:mod:`atrium.kit.engine`.

Services ``flush()``; the owner of the session commits. For a request that is
:func:`get_db_session`, which commits when the endpoint returns and only then sends the jobs
the request enqueued (see :mod:`atrium.kit.enqueue`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated

import structlog
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from atrium.kit.engine import (
    CONNECT_TIMEOUT_SECONDS,
    AccountSession,
    SQLiteBusy,
    create_engine,
    create_sessionmaker,
    write_session,
    writing,
)
from atrium.kit.enqueue import discard_jobs, send_jobs

# The engine layer is re-exported: callers take sessions, engines and units of work from here.
__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "AccountSession",
    "AfterCommit",
    "DBSession",
    "SQLiteBusy",
    "after_commit",
    "create_engine",
    "create_sessionmaker",
    "get_db_session",
    "unit_of_work",
    "write_session",
    "writing",
]

log = structlog.get_logger("atrium.kit.db")

_AFTER_COMMIT = "atrium_after_commit"
_OPEN = "atrium_unit_of_work_open"
#: Request methods whose unit of work may write (and so takes SQLite's write lock up front).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: Called once the unit of work ended: ``True`` when it committed, ``False`` on rollback.
AfterCommit = Callable[[bool], Awaitable[None]]


def after_commit(session: AsyncSession, callback: AfterCommit) -> bool:
    """Run ``callback(committed)`` when ``session``'s unit of work ends.

    Returns:
        ``False`` when ``session`` is not an open unit of work (its owner already committed,
        or it is not one of :func:`unit_of_work`'s): nothing was registered, act now.
    """
    if not session.info.get(_OPEN):
        return False
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)
    return True


async def _run_after_commit(session: AsyncSession, committed: bool) -> None:
    callbacks: list[AfterCommit] = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            await callback(committed)
        except Exception:
            # The transaction is over either way; one failed hook must not skip the others.
            log.exception("after_commit_failed", committed=committed)


@asynccontextmanager
async def unit_of_work(
    sessionmaker: async_sessionmaker[AsyncSession], *, write: bool = True
) -> AsyncIterator[AsyncSession]:
    """A session that commits on success, rolls back on error, then runs the
    :func:`after_commit` hooks and sends enqueued jobs.

    Args:
        sessionmaker: where the session comes from.
        write: the unit may write (see :func:`writing`); ``False`` for read-only work, which
            on SQLite then never waits for writers.
    """
    async with sessionmaker() as session:
        try:
            async with writing(session) if write else nullcontext():
                session.info[_OPEN] = True
                try:
                    yield session
                except BaseException:
                    session.info.pop(_OPEN, None)
                    await session.rollback()
                    raise
                session.info.pop(_OPEN, None)
                await session.commit()
        except BaseException:
            # The writer's turn (SQLite) is given back before the hooks run: they may write.
            discard_jobs(session)
            await _run_after_commit(session, committed=False)
            raise
        await _run_after_commit(session, committed=True)
        # Never raises: a job the broker does not take now stays in the outbox (kit.outbox).
        await send_jobs(session, sessionmaker)


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Request dependency: one session per request, committed before the response is sent.

    The session is also left on ``request.state.db_session`` so that code given only the
    request (the quota engine) can find the request's unit of work.
    """
    write = request.method not in _SAFE_METHODS
    async with unit_of_work(request.app.state.sessionmaker, write=write) as session:
        request.state.db_session = session
        yield session


#: Use this in endpoints. ``scope="function"`` commits before the response goes out, so a
#: failed commit becomes an error response instead of a lost write after a 2xx.
DBSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]
