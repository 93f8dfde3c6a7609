"""The account database's engine and sessions, and the turn-taking of SQLite writers.

The layer below the unit of work: :mod:`atrium.kit.db` (which sends a unit's jobs after its
commit, so imports :mod:`atrium.kit.enqueue`) and :mod:`atrium.kit.enqueue` (whose outbox
cleanup is a short write of its own) both build on it, and it imports neither.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

_BEGIN_PENDING = "atrium_sqlite_begin_pending"
_WRITE = "atrium_sqlite_write"
_TURN = "atrium_sqlite_writer_turn"
#: Statements that start a transaction without needing the write lock.
_READ_ONLY = re.compile(r"\s*(SELECT|WITH|PRAGMA|EXPLAIN)\b", re.IGNORECASE)

#: Seconds a new MySQL/MariaDB connection may take (aiomysql waits forever by default: a host
#: that drops packets would hang each request until the kernel gives up, minutes later).
CONNECT_TIMEOUT_SECONDS = 5


def create_engine(url: str, pool_size: int = 10, *, busy_timeout: float = 30.0) -> AsyncEngine:
    """Create the async engine for MySQL/MariaDB or SQLite.

    A MySQL/MariaDB engine pings each pooled connection as it is checked out
    (``pool_pre_ping``): after the server restarted, the first request gets a fresh connection
    instead of the dead one, and no restart of the app or the worker is needed. While the
    server is down, connecting fails at once (refused) or after
    :data:`CONNECT_TIMEOUT_SECONDS` (unreachable host), and the request answers 503.

    Args:
        url: the database URL.
        pool_size: connections kept (MySQL/MariaDB).
        busy_timeout: seconds a SQLite connection waits for another's write lock before it
            fails with "database is locked".
    """
    # hide_parameters: a failed statement's error (and so the error log) shows its SQL but not
    # the bound values, which are tenant data (collection names, descriptions, addresses).
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": busy_timeout}, "hide_parameters": True}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800)
        # READ COMMITTED, not InnoDB's REPEATABLE READ: its gap locks made concurrent uploads
        # (INSERT into job_outbox) and the deletes of sent jobs deadlock each other (error
        # 1213, a 503 for the upload; seen by bench/quality.py's parallel uploads). Nothing
        # here relies on repeatable snapshots: uniqueness is held by unique keys (still
        # locked under READ COMMITTED) and counters by atomic updates.
        kwargs["isolation_level"] = "READ COMMITTED"
        if "connect_timeout" not in make_url(url).query:  # one given in the URL wins
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
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
            # BEGIN goes out with the transaction's first statement (below), once it is known
            # whether the transaction must take the write lock up front.
            conn.info[_BEGIN_PENDING] = True

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _sqlite_lazy_begin(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            if not conn.info.pop(_BEGIN_PENDING, False):
                return
            # A deferred transaction that has read and then writes cannot wait for the write
            # lock once another connection committed meanwhile: SQLite answers "database is
            # locked" at once, the busy timeout does not apply (docs/decisions/0012). So a
            # transaction that may write, or whose first statement writes, takes the lock at
            # BEGIN, where the busy timeout does apply; read-only ones stay deferred and never
            # wait for writers (WAL).
            writes = conn.get_execution_options().get(_WRITE, False)
            if writes or not _READ_ONLY.match(statement):
                cursor.execute("BEGIN IMMEDIATE")
            else:
                cursor.execute("BEGIN")

    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (responses are built after it)."""
    return async_sessionmaker(
        engine, class_=AccountSession, expire_on_commit=False, autoflush=False
    )


class SQLiteBusy(OperationalError):
    """This process's writers of a SQLite database waited too long for their turn."""

    def __init__(self, waited: float) -> None:
        super().__init__(
            "waiting for the SQLite write lock", None, Exception(f"database is locked ({waited} s)")
        )


@dataclass
class _Writers:
    """The writers of one SQLite database in this process (and event loop): one at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    owner: asyncio.Task[Any] | None = None


_WRITERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Writers]] = (
    weakref.WeakKeyDictionary()
)


def _writers(database: str) -> _Writers:
    per_loop = _WRITERS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(database, _Writers())


class _Turn:
    """A session's claim to be one of its process's SQLite writers, one transaction at a time.

    Taken just before the transaction's first statement (so a request that reads a slow upload
    body first holds nothing meanwhile), given back when the transaction commits or rolls back.
    """

    def __init__(self, writers: _Writers, wait: float) -> None:
        self.writers = writers
        self.wait = wait
        self.held = False

    async def take(self) -> None:
        task = asyncio.current_task()
        if self.writers.owner is not None and self.writers.owner is task:
            return  # nested in this task's own turn (a detached write): not behind itself
        try:
            await asyncio.wait_for(self.writers.lock.acquire(), self.wait)
        except TimeoutError:
            raise SQLiteBusy(self.wait) from None
        self.writers.owner = task
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.writers.owner = None
            self.writers.lock.release()


class AccountSession(AsyncSession):
    """The account database's session: on SQLite, a session that may write (:func:`writing`)
    waits for its process's writer turn before each transaction's first statement, and takes
    the database's write lock with it (``BEGIN IMMEDIATE``)."""

    async def _turn(self) -> None:
        turn: _Turn | None = self.info.get(_TURN)
        if turn is None or turn.held or self.in_transaction():
            return
        await turn.take()
        try:
            await super().connection(execution_options={_WRITE: True})
        except BaseException:
            turn.give_back()
            raise

    def _end(self) -> None:
        turn: _Turn | None = self.info.get(_TURN)
        if turn is not None and not self.in_transaction():
            turn.give_back()

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().execute(*args, **kwargs)

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().scalar(*args, **kwargs)

    async def scalars(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().scalars(*args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().get(*args, **kwargs)

    async def get_one(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().get_one(*args, **kwargs)

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().stream(*args, **kwargs)

    async def stream_scalars(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().stream_scalars(*args, **kwargs)

    async def flush(self, *args: Any, **kwargs: Any) -> None:
        await self._turn()
        await super().flush(*args, **kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> None:
        await self._turn()
        await super().refresh(*args, **kwargs)

    async def merge(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().merge(*args, **kwargs)

    async def delete(self, *args: Any, **kwargs: Any) -> None:
        await self._turn()
        await super().delete(*args, **kwargs)

    async def run_sync(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().run_sync(*args, **kwargs)

    async def connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._turn()
        return await super().connection(*args, **kwargs)

    async def commit(self) -> None:
        if self.new or self.dirty or self.deleted:
            await self._turn()  # the commit's flush writes
        try:
            await super().commit()
        finally:
            self._end()

    async def rollback(self) -> None:
        try:
            await super().rollback()
        finally:
            self._end()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._end()


@asynccontextmanager
async def writing(session: AsyncSession, *, wait: float = 30.0) -> AsyncIterator[None]:
    """Declare that ``session``'s transactions inside this block may write.

    On SQLite, the database has a single write lock. Writers of this process take turns in
    arrival order (an asyncio lock, so a burst of uploads cannot starve a quota write the way
    SQLite's polling busy handler does), each transaction from its first statement to its
    commit or rollback, and the transaction takes the lock with that first statement (``BEGIN
    IMMEDIATE``), where the busy timeout applies, instead of failing with "database is locked"
    when it writes after reading while another connection committed. A write nested in the
    same task's own turn (rare: a detached audit write) does not queue behind itself. On
    MySQL/MariaDB, or for a session that is not an :class:`AccountSession`, this does nothing.

    Raises:
        SQLiteBusy: (from the session's first statement) the turn did not come within ``wait``
            seconds.
    """
    bind = session.bind
    if not isinstance(session, AccountSession) or bind is None or bind.dialect.name != "sqlite":
        yield
        return
    turn = _Turn(_writers(str(bind.sync_engine.url.database)), wait)
    session.info[_TURN] = turn
    try:
        yield
    finally:
        session.info.pop(_TURN, None)
        turn.give_back()


@asynccontextmanager
async def write_session(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A plain session for a short transaction that writes (see :func:`writing`); the caller
    commits."""
    async with sessionmaker() as session, writing(session):
        yield session
