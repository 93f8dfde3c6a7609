"""The account database: engine, sessions and the request-scoped unit of work.

Services ``flush()``; the owner of the session commits. For a request that is
:func:`get_db_session`, which commits when the endpoint returns and only then sends the jobs
the request enqueued (see :mod:`atrium.kit.enqueue`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from atrium.kit.enqueue import discard_jobs, send_jobs

log = structlog.get_logger("atrium.kit.db")

_AFTER_COMMIT = "atrium_after_commit"
_OPEN = "atrium_unit_of_work_open"

#: Called once the unit of work ended: ``True`` when it committed, ``False`` on rollback.
AfterCommit = Callable[[bool], Awaitable[None]]


def create_engine(url: str, pool_size: int = 10, *, busy_timeout: float = 30.0) -> AsyncEngine:
    """Create the async engine for MySQL/MariaDB or SQLite.

    Args:
        url: the database URL.
        pool_size: connections kept (MySQL/MariaDB).
        busy_timeout: seconds a SQLite connection waits for another's write lock before it
            fails with "database is locked".
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": busy_timeout}}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            # SQLite ignores foreign keys unless asked;
            # WAL lets the worker read while the API writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cur.close()
            # The sqlite3 driver opens and commits transactions on its own, which breaks
            # SAVEPOINT semantics (releasing a savepoint would commit for good). Let SQLAlchemy
            # issue BEGIN itself, as its SQLite documentation recommends.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


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
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session that commits on success, rolls back on error, then runs the
    :func:`after_commit` hooks and sends enqueued jobs."""
    async with sessionmaker() as session:
        session.info[_OPEN] = True
        try:
            yield session
        except BaseException:
            session.info.pop(_OPEN, None)
            await session.rollback()
            discard_jobs(session)
            await _run_after_commit(session, committed=False)
            raise
        session.info.pop(_OPEN, None)
        try:
            await session.commit()
        except BaseException:
            discard_jobs(session)
            await _run_after_commit(session, committed=False)
            raise
        await _run_after_commit(session, committed=True)
        await send_jobs(session)


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Request dependency: one session per request, committed before the response is sent.

    The session is also left on ``request.state.db_session`` so that code given only the
    request (the quota engine) can find the request's unit of work.
    """
    async with unit_of_work(request.app.state.sessionmaker) as session:
        request.state.db_session = session
        yield session


#: Use this in endpoints. ``scope="function"`` commits before the response goes out, so a
#: failed commit becomes an error response instead of a lost write after a 2xx.
DBSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]
