"""The account database: engine, sessions and the request-scoped unit of work.

Services ``flush()``; the owner of the session commits. For a request that is
:func:`get_db_session`, which commits when the endpoint returns and only then sends the jobs
the request enqueued (see :mod:`atrium.kit.enqueue`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from atrium.kit.enqueue import discard_jobs, send_jobs


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    """Create the async engine for MySQL/MariaDB or SQLite."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 30}}
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
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def unit_of_work(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session that commits on success, rolls back on error, then sends enqueued jobs."""
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            discard_jobs(session)
            raise
        await session.commit()
        await send_jobs(session)


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Request dependency: one session per request, committed before the response is sent."""
    async with unit_of_work(request.app.state.sessionmaker) as session:
        yield session


#: Use this in endpoints. ``scope="function"`` commits before the response goes out, so a
#: failed commit becomes an error response instead of a lost write after a 2xx.
DBSession = Annotated[AsyncSession, Depends(get_db_session, scope="function")]
