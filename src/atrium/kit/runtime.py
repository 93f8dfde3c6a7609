"""Per-process resources for Celery tasks, and a way to run async code from them.

Celery's prefork children are separate processes; each gets its own event loop, engine, vector
pool and Redis client, created lazily on first use so nothing crosses a fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from atrium.config import Settings, get_settings
from atrium.kit.db import create_engine, create_sessionmaker
from atrium.kit.redis import create_redis
from atrium.kit.vectordb import create_pool

T = TypeVar("T")


@dataclass
class Resources:
    """Connections a task may use; owned by the worker process."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    vector_pool: AsyncConnectionPool
    redis: Redis


_state: dict[str, Any] = {}


def _loop() -> asyncio.AbstractEventLoop:
    if _state.get("pid") != os.getpid():
        _state.clear()
        _state["pid"] = os.getpid()
        _state["loop"] = asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = _state["loop"]
    return loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on this process's long-lived loop (pools stay bound to it).

    An exception raised into the loop itself rather than the coroutine (Celery's soft time
    limit, a signal, while the loop waits for I/O) cancels the coroutine before it propagates:
    left pending, it would resume during the process's next task.
    """
    loop = _loop()
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(task)
        raise


async def resources() -> Resources:
    """This process's resources, opened on first use."""
    _loop()
    res: Resources | None = _state.get("resources")
    if res is None:
        settings = get_settings()
        engine = create_engine(settings.resolved_database_url, pool_size=2)
        pool = create_pool(
            settings.vector_conninfo, max_size=4, timeout=settings.vector_pool_timeout_seconds
        )
        # Not waiting for a first connection: a worker that starts while the vector database
        # is down must still claim its documents and retry them (a PoolTimeout at the store
        # stage is transient), not fail every task at this line after 30 s.
        await pool.open(wait=False)
        res = Resources(
            settings=settings,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            vector_pool=pool,
            redis=create_redis(settings.redis_url),
        )
        _state["resources"] = res
    return res


async def close_resources() -> None:
    """Close this process's pools (at worker shutdown)."""
    res: Resources | None = _state.pop("resources", None)
    if res is not None:
        await res.engine.dispose()
        await res.vector_pool.close()
        await res.redis.aclose()
