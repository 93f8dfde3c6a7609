"""`atrium dev` as a person runs it: start, ready, Ctrl-C, nothing left running, data kept.

Two set-ups: everything embedded (no settings at all: SQLite, embedded PostgreSQL, embedded Redis)
and the local MariaDB + Redis with only the embedded PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from tests.support import services

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
#: /readyz shows each component's detail only to the metrics token's bearer.
METRICS_TOKEN = "dev-test-metrics-token"
AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _base_env(data_dir: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    # Nothing of the test session's configuration: no ATRIUM_* at all, ATRIUM_ENVIRONMENT unset.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "ATRIUM_DATA_DIR": str(data_dir),
            "ATRIUM_PORT": str(port),
            "ATRIUM_METRICS_TOKEN": METRICS_TOKEN,
            **extra,
        }
    )
    return env


def _postmaster_pid(data_dir: Path) -> int:
    """The running postmaster's pid; 0 while none (initdb writes a negative one)."""
    try:
        pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return 0
    return max(pid, 0)


@dataclass
class DevRun:
    """One `python -m atrium.cli dev` process and what it started."""

    env: dict[str, str]
    cwd: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started: dict[int, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['ATRIUM_PORT']}"

    def start(self) -> dict[str, object]:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "atrium.cli", "dev"],
            cwd=self.cwd,  # no .env of the repository is read
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        body: dict[str, object] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"atrium dev exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = httpx.get(self.url + "/readyz", headers=AUTH, timeout=5)
                body = r.json()
                if r.status_code == 200:
                    self._record_processes()
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        pytest.fail(f"/readyz never answered 200 (last: {body}):\n{self.tail()}")

    def _record_processes(self) -> None:
        assert self.proc is not None
        parent = psutil.Process(self.proc.pid)
        for child in parent.children(recursive=True):
            try:
                self.started[child.pid] = " ".join(child.cmdline()[-2:])
            except psutil.NoSuchProcess:
                continue
        data_dir = Path(self.env["ATRIUM_DATA_DIR"])
        # The embedded servers daemonize (their parent is init), so find them by pid file.
        pg_pid = _postmaster_pid(data_dir)
        if pg_pid:
            self.started[pg_pid] = "embedded postgres"
        redis_pid = data_dir / "redis" / "redis.pid"
        if redis_pid.exists():
            self.started[int(redis_pid.read_text().strip())] = "embedded redis"

    def interrupt(self) -> None:
        """Ctrl-C, then check that every process this run started is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"atrium dev did not stop within {STOP_TIMEOUT} s:\n{self.tail()}")
        assert code == 0, self.tail()
        deadline = time.monotonic() + 10
        alive = self._alive()
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = self._alive()
        assert not alive, f"still running after Ctrl-C: {alive}\n{self.tail()}"

    def _alive(self) -> dict[int, str]:
        alive = {}
        for pid, what in self.started.items():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = what
            except psutil.NoSuchProcess:
                continue
        return alive

    def kill(self) -> None:
        """Last resort after a failure: leave nothing behind for the next test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        for pid in self._alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def dev_runs() -> Iterator[list[DevRun]]:
    runs: list[DevRun] = []
    yield runs
    for run in runs:
        run.kill()


def _assert_all_ok(body: dict[str, object]) -> None:
    components = body["components"]
    assert isinstance(components, dict)
    assert set(components) == {"database", "vector_database", "redis", "worker"}
    for name, component in components.items():
        assert component["status"] == "ok", (name, component)


def _create_superuser(run: DevRun, email: str) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "atrium.cli",
            "create-superuser",
            "--email",
            email,
        ],
        cwd=run.cwd,
        # The password from the environment (never an argument, which `ps` would show).
        env={**run.env, "ATRIUM_SUPERUSER_PASSWORD": "correct horse battery staple"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"created {email}" in r.stdout


def _wait_for_task_metric(url: str, broker_url: str) -> None:
    """A task run by the worker shows in the API's /metrics (one shared metrics directory)."""
    from celery import Celery

    client = Celery("probe", broker=broker_url)
    client.send_task("atrium.ping", kwargs={"payload": "metrics"})
    needle = 'atrium_tasks_total{outcome="success",task="atrium.ping"}'
    text = ""
    for _ in range(60):
        text = httpx.get(url + "/metrics", headers=AUTH, timeout=5).text
        if needle in text:
            break
        time.sleep(0.5)
    assert needle in text, text[-2000:]
    assert "atrium_ingestion_queue_length" in text


def _tasks_done(url: str) -> float:
    needle = 'atrium_tasks_total{outcome="success",task="atrium.ping"} '
    for line in httpx.get(url + "/metrics", headers=AUTH, timeout=5).text.splitlines():
        if line.startswith(needle):
            return float(line[len(needle) :])
    return 0.0


def _check_worker_restarts(run: DevRun, broker_url: str) -> None:
    """The worker killed (as the OOM killer would): the API keeps answering, a new worker
    starts by itself and runs the next job; Ctrl-C later stops the new one too."""
    from celery import Celery

    assert run.proc is not None
    (worker,) = [
        p
        for p in psutil.Process(run.proc.pid).children()
        if p.cmdline()[-2:] == ["atrium.cli", "worker"]
    ]
    done = _tasks_done(run.url)
    worker.kill()
    worker.wait(10)
    assert httpx.get(run.url + "/v1/plans", timeout=10).status_code == 200
    Celery("probe", broker=broker_url).send_task("atrium.ping", kwargs={"payload": "again"})
    deadline = time.monotonic() + 90
    while _tasks_done(run.url) <= done:
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.5)
    assert "worker exited with code -9; starting it again in 1 s." in run.log.read_text()
    assert run.proc.poll() is None
    run._record_processes()  # the new worker must stop with the rest


def _check_log_lines(run: DevRun) -> None:
    """The processes write the JSON lines docs/logging.md describes, field by field."""
    assert httpx.get(run.url + "/v1/plans", timeout=10).status_code == 200
    # The access line is written once the response has gone out: give the log a moment.
    lines: list[dict[str, Any]] = []
    access: list[dict[str, Any]] = []
    for _ in range(50):
        lines = []
        for raw in run.log.read_text(errors="replace").splitlines():
            if raw.startswith("{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(raw))
        access = [x for x in lines if x.get("event") == "request" and x.get("path") == "/v1/plans"]
        if access:
            break
        time.sleep(0.2)
    assert access, "no access line for /v1/plans"
    assert set(access[-1]) == {
        "event",
        "level",
        "timestamp",
        "request_id",
        "method",
        "path",
        "route",
        "status",
        "duration_ms",
        "tenant_id",
        "principal",
    }
    assert access[-1]["route"] == "/v1/plans"  # the template, with its router prefix
    assert access[-1]["status"] == 200 and access[-1]["timestamp"].endswith("Z")
    # The worker's lines (Celery's own included) are JSON too, with the library logger named.
    assert any(x.get("logger", "").startswith("celery") for x in lines), "no JSON Celery line"


def _check_api_guide(run: DevRun) -> None:
    """Every command of docs/api-guide.md, run against this fresh instance, prints what the
    guide shows (scripts/check-api-guide): the guide cannot drift from the API."""
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "check-api-guide"),
            "--url",
            run.url,
            "--outbox",
            str(Path(run.env["ATRIUM_DATA_DIR"]) / "outbox"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}\n{run.tail()}"
    assert r.returncode == 0, report
    assert re.search(r"^\d+ passed, 0 failed$", r.stdout, re.M), report


def test_dev_with_everything_embedded(tmp_path: Path, dev_runs: list[DevRun]) -> None:
    data_dir = tmp_path / "data"
    run = DevRun(_base_env(data_dir, _free_port(), {}), tmp_path, tmp_path / "dev.log")
    dev_runs.append(run)

    body = run.start()
    _assert_all_ok(body)
    assert body["components"]["database"]["detail"] == "sqlite"  # type: ignore[index]
    names = sorted(run.started.values())
    assert "embedded postgres" in names and "embedded redis" in names
    assert any(n.endswith("serve") for n in names) and any(n.endswith("beat") for n in names)
    sock = data_dir / "redis" / "redis.sock"
    r = redis.Redis(unix_socket_path=str(sock))
    r.set("atrium:test:kept", "across restarts")
    r.close()
    _wait_for_task_metric(run.url, f"redis+socket://{sock}")
    _check_log_lines(run)
    # On the fresh instance (the guide starts from an empty Atrium, as ./scripts/run gives).
    _check_api_guide(run)
    _check_worker_restarts(run, f"redis+socket://{sock}")
    run.interrupt()

    # Between runs: a superuser, created with the servers the command starts for itself.
    _create_superuser(run, "root@example.com")

    again = DevRun(run.env, tmp_path, tmp_path / "dev2.log")
    dev_runs.append(again)
    _assert_all_ok(again.start())
    r = redis.Redis(unix_socket_path=str(sock))
    assert r.get("atrium:test:kept") == b"across restarts"
    r.close()
    with sqlite3.connect(data_dir / "atrium.db") as db:
        rows = db.execute(
            "SELECT is_superuser, is_verified FROM users WHERE email = 'root@example.com'"
        ).fetchall()
    assert rows == [(1, 1)]
    again.interrupt()


def test_dev_with_local_mariadb_and_redis(tmp_path: Path, dev_runs: list[DevRun]) -> None:
    db_name = services.create_mysql_database()
    # This xdist worker's own app db (services.redis_dbs): no other worker's, whatever -n and
    # ATRIUM_TEST_REDIS_DB_BASE are. The tests of one worker run one at a time, each leaves the
    # db flushed (clean_state), and the session's Celery worker takes its jobs from the broker
    # db, not this one: the dev run has it to itself.
    dev_redis_db, _ = services.redis_dbs()
    client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=dev_redis_db)
    client.flushdb()
    redis_url = f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{dev_redis_db}"
    env = _base_env(
        tmp_path / "data",
        _free_port(),
        {
            "ATRIUM_DATABASE_URL": (
                f"mysql+aiomysql://{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@"
                f"{services.MYSQL_HOST}:{services.MYSQL_PORT}/{db_name}"
            ),
            "ATRIUM_REDIS_URL": redis_url,
        },
    )
    try:
        run = DevRun(env, tmp_path, tmp_path / "dev.log")
        dev_runs.append(run)
        body = run.start()
        _assert_all_ok(body)
        assert body["components"]["database"]["detail"] == "mysql"  # type: ignore[index]
        assert "embedded redis" not in run.started.values()
        marker = uuid.uuid4().hex
        client.set("atrium:test:kept", marker)
        run.interrupt()
        # Ctrl-C leaves the local servers' data alone (a restart on kept data is the embedded
        # case's, above: with MariaDB and Redis running on their own it proves nothing more).
        assert client.get("atrium:test:kept") == marker.encode()

        _create_superuser(run, "ops@example.com")
        with services.mysql_connect(db_name) as conn, conn.cursor() as cur:
            cur.execute("SELECT is_superuser FROM users WHERE email = 'ops@example.com'")
            assert cur.fetchall() == ((1,),)
    finally:
        client.flushdb()
        client.close()
        services.drop_mysql_database(db_name)


def test_ctrl_c_while_starting_leaves_nothing_running(
    tmp_path: Path, dev_runs: list[DevRun]
) -> None:
    data_dir = tmp_path / "data"
    run = DevRun(_base_env(data_dir, _free_port(), {}), tmp_path, tmp_path / "dev.log")
    dev_runs.append(run)
    run.proc = subprocess.Popen(
        [sys.executable, "-m", "atrium.cli", "dev"],
        cwd=run.cwd,
        env=run.env,
        stdout=run.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    # Interrupt as soon as the embedded PostgreSQL runs, long before the API is up.
    deadline = time.monotonic() + READY_TIMEOUT
    while not _postmaster_pid(data_dir):
        assert run.proc.poll() is None, run.tail()
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.1)
    run._record_processes()
    assert "embedded postgres" in run.started.values()
    run.interrupt()
    assert "Atrium stopped." in run.tail()
