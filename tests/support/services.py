"""Real services for the test session: MariaDB, Redis, embedded PostgreSQL, a Celery worker.

A service that is missing fails the run with a message; nothing is skipped or mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pymysql
import redis

MYSQL_HOST = os.environ.get("ATRIUM_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("ATRIUM_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("ATRIUM_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("ATRIUM_TEST_MYSQL_PASSWORD", "")
REDIS_HOST = os.environ.get("ATRIUM_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("ATRIUM_TEST_REDIS_PORT", "6379"))


class ServiceMissing(RuntimeError):
    """A service the tests need is not running; ./scripts/test starts them."""


def worker_index() -> int:
    """0 for the first pytest-xdist worker (or no xdist), 1 for the next..."""
    wid = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(wid[2:]) if wid.startswith("gw") else 0


def mysql_connect(database: str | None = None) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    try:
        return pymysql.connect(
            host=MYSQL_HOST,
            port=MYSQL_PORT,
            user=MYSQL_USER,
            password=MYSQL_PASSWORD,
            database=database,
            autocommit=True,
        )
    except pymysql.err.OperationalError as exc:
        raise ServiceMissing(
            f"MariaDB/MySQL is not reachable at {MYSQL_HOST}:{MYSQL_PORT} ({exc}). "
            "Start it (./scripts/test does) and run the tests again."
        ) from exc


def create_mysql_database() -> str:
    name = f"atrium_test_{uuid.uuid4().hex[:8]}_{worker_index()}"
    with mysql_connect() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    return name


def drop_mysql_database(name: str) -> None:
    with mysql_connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def redis_dbs() -> tuple[int, int]:
    """Two Redis db indexes for this xdist worker: the app's and the Celery broker's."""
    base = int(os.environ.get("ATRIUM_TEST_REDIS_DB_BASE", "2"))
    app_db = base + 2 * worker_index()
    if app_db + 1 > 15:
        raise ServiceMissing("ran out of Redis db indexes; lower ATRIUM_TEST_REDIS_DB_BASE or -n")
    return app_db, app_db + 1


def check_redis(db: int) -> redis.Redis:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        raise ServiceMissing(
            f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({exc}). "
            "Start it (./scripts/test does) and run the tests again."
        ) from exc
    return client


def stop_stale_workers(broker_url: str, timeout: float = 30.0) -> list[str]:
    """Shut down Celery workers that already consume ``broker_url`` (none should).

    A test run killed from outside (a ``timeout``, Ctrl-C twice) leaves its workers running:
    they are started in their own sessions. One left on this session's broker db takes this
    session's jobs and runs them against the databases of the run that died, so documents stay
    queued for minutes and tests fail far from the cause. Each is told to shut down; one that
    does not within ``timeout`` fails the session with its name.

    Returns:
        The names of the workers that were stopped (empty when none answered).
    """
    from celery import Celery

    probe = Celery("atrium-test-probe", broker=broker_url)
    try:
        names = sorted({name for reply in probe.control.ping(timeout=1.0) or [] for name in reply})
        if not names:
            return []
        print(f"stopping stale Celery workers on {broker_url}: {names}", file=sys.stderr)
        probe.control.shutdown(destination=names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not probe.control.ping(timeout=1.0):
                return names
        raise ServiceMissing(
            f"Celery workers {names} of an earlier run consume {broker_url} and did not stop "
            "when told to; kill them (pkill -f tests.support.worker) and run the tests again"
        )
    finally:
        probe.close()


def reset_state(mysql_db: str, redis_db: int) -> None:
    """Empty every account table of ``mysql_db`` and flush the app's Redis db ``redis_db``:
    what the ``clean_state`` fixture does after each test, and what module-scoped fixtures
    (one tenant for a whole module) do once at their end."""
    from atrium.models import Base

    with mysql_connect(mysql_db) as conn, conn.cursor() as cur:
        cur.execute("SET FOREIGN_KEY_CHECKS=0")
        for table in reversed(Base.metadata.sorted_tables):
            cur.execute(f"DELETE FROM `{table.name}`")
        cur.execute("SET FOREIGN_KEY_CHECKS=1")
    check_redis(redis_db).flushdb()


def start_pgserver() -> tuple[object, str, Path]:
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="atrium-pg-"))
    server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    server.psql("CREATE DATABASE atrium_test;")
    uri = server.get_uri("atrium_test")
    return server, uri, root


class WorkerProcess:
    """A real Celery worker in a subprocess, started with the test session's environment."""

    def __init__(
        self, env: dict[str, str], log_path: Path, argv: Sequence[str] = ("--pool=solo",)
    ) -> None:
        self.env = env
        self.log_path = log_path
        #: ``atrium worker`` options (a prefork pool where a test needs one).
        self.argv = list(argv)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        from atrium.worker import celery_app

        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            # atrium worker plus the test-only tasks, which src/ must not carry.
            [sys.executable, "-m", "tests.support.worker", *self.argv],
            env=self.env,
            cwd=Path(__file__).resolve().parents[2],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the Celery worker exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            if celery_app.control.ping(timeout=0.5):
                return
        self.kill()  # no orphan left consuming the broker after a failed start
        raise RuntimeError(
            "the Celery worker did not answer a ping:\n" + self.log_path.read_text()[-3000:]
        )

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and its children), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
