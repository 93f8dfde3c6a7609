"""Session-wide real services and per-test isolation.

Per pytest-xdist worker: a MariaDB database migrated once, two Redis db indexes (app, broker),
an embedded PostgreSQL + pgvector, an SMTP server, an OpenAI-compatible LLM server and, on
demand, a real Celery worker subprocess. Each test gets a flushed Redis db and emptied tables.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.support import services
from tests.support.llm_server import LLMServer
from tests.support.smtp import Mailbox


def pytest_configure(config: pytest.Config) -> None:
    """Let ``scripts/test``'s watchdog ask this process for its threads' stacks.

    A run that outlives its limit gets SIGUSR1 in every pytest process before it is stopped:
    faulthandler then writes each thread's stack to the run's stderr (captured output dies with
    a killed process). The pid goes to ``$ATRIUM_TEST_PIDS_DIR`` for the watchdog to find.
    """
    # Capture is suspended during pytest_configure: fd 2 is still the run's stderr.
    stderr = os.dup(2)
    timeout = float(config.getini("faulthandler_timeout") or 0)
    if timeout > 0:
        # pytest arms faulthandler.dump_traceback_later for each test. A child forked while it
        # is armed inherits faulthandler's "watchdog running" lock without the watchdog thread:
        # if the child then dies of a fatal error, faulthandler's clean-up waits on that lock
        # forever. So it is disarmed around each fork, and re-armed in the parent (the clock
        # restarts there: it is a diagnostic, not a limit). The extraction sandbox no longer
        # forks this process (its children come from a reader server of their own); this
        # stays for any test that does.
        os.register_at_fork(
            before=faulthandler.cancel_dump_traceback_later,
            after_in_parent=lambda: faulthandler.dump_traceback_later(timeout, file=stderr),
        )
    pids_dir = os.environ.get("ATRIUM_TEST_PIDS_DIR")
    if pids_dir:
        faulthandler.register(signal.SIGUSR1, file=stderr, all_threads=True)
        Path(pids_dir, str(os.getpid())).touch()


@pytest.fixture(scope="session")
def test_env() -> Iterator[dict[str, Any]]:
    """Start or check every service and export the ATRIUM_* settings that point at them."""
    app_db, broker_db = services.redis_dbs()
    for db in (app_db, broker_db):
        services.check_redis(db).flushdb()
    services.stop_stale_workers(f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{broker_db}")
    mysql_db = services.create_mysql_database()
    pg, pg_uri, _pg_root = services.start_pgserver()
    mailbox = Mailbox()
    smtp_port = mailbox.start()
    llm = LLMServer()
    llm.start()
    data_dir = Path(tempfile.mkdtemp(prefix="atrium-data-"))
    env = {
        "ATRIUM_ENVIRONMENT": "test",
        "ATRIUM_DATA_DIR": str(data_dir),
        "ATRIUM_DATABASE_URL": (
            f"mysql+aiomysql://{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@"
            f"{services.MYSQL_HOST}:{services.MYSQL_PORT}/{mysql_db}?charset=utf8mb4"
        ),
        "ATRIUM_VECTOR_DATABASE_URL": pg_uri.replace("postgresql://", "postgresql+psycopg://"),
        "ATRIUM_REDIS_URL": f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{app_db}",
        "ATRIUM_CELERY_BROKER_URL": (
            f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{broker_db}"
        ),
        "ATRIUM_SMTP_HOST": "127.0.0.1",
        "ATRIUM_SMTP_PORT": str(smtp_port),
        "ATRIUM_PUBLIC_URL": "http://testserver",
        "ATRIUM_LOG_LEVEL": "WARNING",
        "ATRIUM_SECRET_KEY": "test-secret-key-that-is-long-enough-0123456789",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from atrium.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    from atrium.kit.migrations import migrate_all

    migrate_all(
        settings.resolved_database_url, settings.vector_conninfo, settings.embedding_dimension
    )
    yield {
        "env": env,
        "mysql_db": mysql_db,
        "mailbox": mailbox,
        "llm": llm,
        "pg": pg,
        "data_dir": data_dir,
        "redis_db": app_db,
        "broker_db": broker_db,
    }
    mailbox.stop()
    llm.stop()
    services.drop_mysql_database(mysql_db)
    pg.cleanup()  # type: ignore[attr-defined]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def settings(test_env: dict[str, Any]) -> Any:
    from atrium.config import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def mailbox(test_env: dict[str, Any]) -> Mailbox:
    return test_env["mailbox"]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def llm_server(test_env: dict[str, Any]) -> Iterator[LLMServer]:
    server: LLMServer = test_env["llm"]
    yield server
    server.behaviour.clear()


@pytest.fixture(scope="session")
def celery_worker(test_env: dict[str, Any]) -> Iterator[services.WorkerProcess]:
    """A real Celery worker subprocess on this xdist worker's broker.

    Its Prometheus metrics go to the directory ``worker.env["PROMETHEUS_MULTIPROC_DIR"]``, as
    under ``atrium worker --metrics-port`` and ``atrium dev`` (the worker's counters live in
    its own process: tests/ops/test_metrics.py reads them there). A directory, not a port: a port
    chosen now might be taken by the time a test restarts the worker.
    """
    metrics_dir = test_env["data_dir"] / "worker-metrics"
    metrics_dir.mkdir(exist_ok=True)
    # INFO: its log (read by tests that fail waiting on it) says which job ran when.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "ATRIUM_LOG_LEVEL": "INFO"}
    worker = services.WorkerProcess(env, test_env["data_dir"] / "worker.log")
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def live_server(test_env: dict[str, Any], celery_worker: services.WorkerProcess) -> Iterator[Any]:
    """The API over real HTTP (``atrium serve``), with the session's services and worker.

    Its answers are generative: its LLM is the session's loopback OpenAI-compatible server
    (``llm_server``; set its ``behaviour["answer"]`` to choose what the model says). The settings
    are the server process's own: the in-process ``app`` stays extractive.
    """
    from tests.support.live import LiveServer

    llm = {
        "ATRIUM_LLM_MODEL": "openai/test-model",
        "ATRIUM_LLM_API_BASE": test_env["llm"].base_url,
        "ATRIUM_LLM_API_KEY": "sk-test",
    }
    server = LiveServer({**os.environ, **llm}, test_env["data_dir"] / "live-server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def app(test_env: dict[str, Any]) -> AsyncIterator[Any]:
    from atrium.app import create_app

    application = create_app()
    async with LifespanManager(application, startup_timeout=60):
        yield application


@pytest.fixture
async def sqlite_app(settings: Any, tmp_path: Path, clean_state: None) -> AsyncIterator[Any]:
    """A second app whose account database is a SQLite file (the embedded default's), with the
    session's other services."""
    from atrium.app import create_app
    from atrium.config import load_settings
    from atrium.kit.migrations import upgrade_account_db

    url = f"sqlite+aiosqlite:///{tmp_path}/a.db"
    upgrade_account_db(url, "heads")
    app = create_app(load_settings(**{**settings.model_dump(), "database_url": url}))
    async with LifespanManager(app, startup_timeout=60):
        assert app.state.engine.dialect.name == "sqlite"
        yield app


@pytest.fixture
def clean_state(test_env: dict[str, Any]) -> Iterator[None]:
    """Empty every account table and the app's Redis db after the test."""
    yield
    services.reset_state(test_env["mysql_db"], test_env["redis_db"])


@pytest.fixture
async def client(app: Any, clean_state: None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in-process (real databases behind it)."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c
    await drain_background_writes(app)


async def drain_background_writes(app: Any) -> None:
    """Finish the app's batched settlements (and the usage warnings they send) while the event
    loop still runs: ``clean_state``'s cleanup is synchronous, and a write paused mid-transaction
    would hold the row locks it waits for (MariaDB's 50 s lock wait, then an error)."""
    from atrium.billing.quota import Quota

    await Quota.of(app).close()


@pytest.fixture
async def db_session(app: Any) -> AsyncIterator[Any]:
    """A session inside a transaction that is rolled back after the test.

    Service code may ``commit()`` through savepoints; nothing reaches the database for good.
    """
    from sqlalchemy.ext.asyncio import AsyncSession

    async with app.state.engine.connect() as conn:
        trans = await conn.begin()
        session = AsyncSession(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            await session.close()
            await trans.rollback()
