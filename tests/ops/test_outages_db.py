"""The databases and the worker go away under a running app, on real processes; all come back
without a restart of the app or the worker.

Each test stops a *private* server (the suite's MariaDB and PostgreSQL serve other test
processes and are never stopped): a ``mariadbd`` on its own data directory and port, a
pgserver PostgreSQL on its own data directory, and a Celery worker (prefork, as in production)
on its own queue.

* Account database (MariaDB) killed: a request in flight, blocked on a row lock, answers 503;
  the next ones answer 503 with Retry-After at once; once the server is back the next request
  succeeds (the pool pings each connection it hands out), and so does the worker's own
  database session (the same engine code, run in-process).
* Vector database (PostgreSQL) stopped: searches answer 503 within 2 s; a document uploaded
  meanwhile is retried by the worker (more times than ``ATRIUM_INGESTION_MAX_ATTEMPTS``: runs
  that ended in a retry are not crashes) and ends ``ready`` once the server is back; then no
  ``ready`` document lacks its chunks and no chunk lacks a ``ready`` document.
* A worker pool process killed mid-document (what the kernel's out-of-memory killer does):
  the document is handed to a fresh process at once, and after the allowed attempts it ends
  ``failed`` with a reason, never stuck in ``processing``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pymysql
import pytest
from asgi_lifespan import LifespanManager

from tests.support.factories import bearer, create_tenant, create_user
from tests.support.load import free_port
from tests.support.services import WorkerProcess

# One xdist worker runs the module: its private servers and worker are started once.
pytestmark = pytest.mark.xdist_group("outages-db")


class PrivateMariaDB:
    """A ``mariadbd`` of this test module's own: its data directory, its port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def install(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                *(["--user=root"] if os.geteuid() == 0 else []),
            ],
            check=True,
            stdout=(self.workdir / "install.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [
                "mariadbd",
                "--no-defaults",
                *(["--user=root"] if os.geteuid() == 0 else []),
                f"--datadir={self.datadir}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.workdir / 'sock'}",
                f"--pid-file={self.workdir / 'pid'}",
                "--skip-log-bin",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=16M",
                "--innodb-log-file-size=8M",
            ],
            stdout=(self.workdir / "server.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect().close()
                return
            except pymysql.err.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the private mariadbd did not start:\n"
                        + (self.workdir / "server.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or an out-of-memory kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def connect(self, database: str | None = None) -> Any:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            database=database,
            autocommit=True,
            connect_timeout=2,
        )

    def url(self, database: str) -> str:
        return f"mysql+aiomysql://root:@127.0.0.1:{self.port}/{database}?charset=utf8mb4"


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateMariaDB]:
    server = PrivateMariaDB(tmp_path_factory.mktemp("mariadb"))
    server.install()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
async def mariadb_app(test_env: dict[str, Any], mariadb: PrivateMariaDB) -> AsyncIterator[Any]:
    """The app with its account database on the private MariaDB (migrated the app's own way),
    and the session's Redis and PostgreSQL."""
    from atrium.app import create_app
    from atrium.config import get_settings, load_settings
    from atrium.kit.migrations import upgrade_account_db

    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE atrium CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    url = mariadb.url("atrium")
    upgrade_account_db(url, "heads")
    settings = load_settings(**{**get_settings().model_dump(), "database_url": url})
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60):
        yield app


def _client(app: Any, port: int) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", port), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60)


def _assert_outage(r: httpx.Response, elapsed: float, component: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "5"
    body = r.json()
    assert body["error"] == "ServiceUnavailable" and component in body["detail"], body
    assert elapsed < 2.0, f"the 503 took {elapsed:.2f} s"


async def _timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await request
    return r, time.monotonic() - started


async def _wait_for_lock_wait(mariadb: PrivateMariaDB, timeout: float = 30.0) -> None:
    """Until a transaction of the server waits for a row lock."""
    deadline = time.monotonic() + timeout
    with mariadb.connect() as conn, conn.cursor() as cur:
        while True:
            cur.execute(
                "SELECT count(*) FROM information_schema.innodb_trx WHERE trx_state = 'LOCK WAIT'"
            )
            if cur.fetchone()[0]:
                return
            assert time.monotonic() < deadline, "the request never waited for the row lock"
            # Not faster: MariaDB refreshes this table's cache only when unread for 0.1 s.
            await asyncio.sleep(0.25)


async def test_account_database_killed_answers_503_then_recovers_without_a_restart(
    mariadb: PrivateMariaDB, mariadb_app: Any, clean_state: None
) -> None:
    owner = await create_user(mariadb_app)
    tenant = await create_tenant(mariadb_app, owner)
    headers = await bearer(owner)
    url = f"/v1/tenants/{tenant.id}/collections"
    async with _client(mariadb_app, 50011) as client:
        r = await client.get(url, headers=headers)
        assert r.status_code == 200 and r.json()["items"] == [], r.text

        # A request in flight: its INSERT waits for the tenant row, locked by another
        # connection (the foreign key check), when the server dies under it.
        locker = mariadb.connect("atrium")
        locker.begin()
        with locker.cursor() as cur:
            cur.execute("SELECT id FROM tenants WHERE id = %s FOR UPDATE", (str(tenant.id),))
        in_flight = asyncio.create_task(
            client.post(url, json={"name": "in flight"}, headers=headers)
        )
        await _wait_for_lock_wait(mariadb)
        mariadb.kill()
        r = await asyncio.wait_for(in_flight, 30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert "account database" in r.json()["detail"]
        locker.close()

        # While it is down: 503 with Retry-After, at once (a refused connection), reads and
        # writes alike, and no 500.
        for _ in range(2):
            _assert_outage(*await _timed(client.get(url, headers=headers)), "account database")
            _assert_outage(
                *await _timed(client.post(url, json={"name": "down"}, headers=headers)),
                "account database",
            )

        # Back (after crash recovery): the very next requests succeed, on the same app.
        mariadb.start()
        r = await client.post(url, json={"name": "after"}, headers=headers)
        assert r.status_code == 201, r.text
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        # The request that was in flight was rolled back: only the later collection exists.
        assert [c["name"] for c in r.json()["items"]] == ["after"]

        # A restart while nothing was asked: every pooled connection is dead, and no error
        # told the pool so. The ping on checkout replaces them: no request sees one.
        mariadb.kill()
        mariadb.start()
        for _ in range(3):
            r = await client.get(url, headers=headers)
            assert r.status_code == 200, r.text


async def test_the_workers_database_session_recovers_by_itself(
    mariadb: PrivateMariaDB, mariadb_app: Any, clean_state: None
) -> None:
    """The worker's engine is built by the same ``create_engine`` as the app's; here it runs
    the real pipeline in-process against the private server (a worker subprocess would need
    the whole session on that server): down, the run fails as a *transient* fault, which the
    Celery task retries with backoff; back, the next run of the same engine finishes."""
    from atrium.ingestion import pipeline
    from atrium.ingestion.tools import worker_tools
    from atrium.kit.db import create_engine, create_sessionmaker
    from atrium.kit.runtime import Resources
    from tests.support.documents import prose, setup_tenant

    settings = mariadb_app.state.settings
    async with _client(mariadb_app, 50012) as client:
        ctx = await setup_tenant(mariadb_app, client)
        # Its job goes to the session's worker, whose database has no such document: skipped.
        r = await client.post(ctx.docs, json={"text": prose(300)}, headers=ctx.headers)
        assert r.status_code == 202, r.text
        doc = uuid.UUID(r.json()["documents"][0]["id"])

        engine = create_engine(settings.resolved_database_url, pool_size=2)  # as the worker's
        res = Resources(
            settings=settings,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            vector_pool=mariadb_app.state.vector_pool,
            redis=mariadb_app.state.redis,
        )
        tools = await asyncio.to_thread(worker_tools, settings)
        try:
            from sqlalchemy import text

            async with res.sessionmaker() as session:  # a pooled connection, as after a task
                await session.execute(text("SELECT 1"))
            mariadb.kill()
            with pytest.raises(pipeline.TransientFailure):
                await pipeline.process(res, tools, ctx.tenant.id, doc, max_attempts=5)
            mariadb.start()
            outcome = (await pipeline.process(res, tools, ctx.tenant.id, doc, max_attempts=5))[0]
            assert outcome.status == "ready" and outcome.chunks > 0
        finally:
            await engine.dispose()
        body = (await client.get(f"{ctx.docs}/{doc}", headers=ctx.headers)).json()
        assert body["status"] == "ready" and body["chunk_count"] == outcome.chunks
        assert body["attempts"] == 1  # the run that met the outage never claimed it


class PrivatePostgres:
    """A pgserver PostgreSQL (with pgvector) on a data directory of its own."""

    def __init__(self) -> None:
        import pgserver

        self.root = Path(tempfile.mkdtemp(prefix="atrium-pg-outage-"))
        self.server: Any = pgserver.get_server(self.root / "pgdata", cleanup_mode="delete")
        self.server.psql("CREATE DATABASE atrium;")
        self.conninfo: str = self.server.get_uri("atrium")

    def stop(self) -> None:
        """Stop at once (``immediate``: no checkpoint, crash recovery at the next start)."""
        from pgserver._commands import pg_ctl

        pg_ctl(
            ["-w", "-m", "immediate", "stop"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
        )

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def cleanup(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)

    async def chunks_per_document(self, tenant_id: uuid.UUID) -> dict[uuid.UUID, int]:
        async with await psycopg.AsyncConnection.connect(self.conninfo) as conn:
            cur = await conn.execute(
                "SELECT document_id, count(*) FROM chunks WHERE tenant_id = %s GROUP BY 1",
                (tenant_id,),
            )
            return {row[0]: int(row[1]) for row in await cur.fetchall()}


@pytest.fixture(scope="module")
async def postgres(test_env: dict[str, Any]) -> AsyncIterator[PrivatePostgres]:
    from atrium.config import get_settings
    from atrium.kit.migrations import upgrade_vector_db

    server = PrivatePostgres()
    try:
        await upgrade_vector_db(server.conninfo, get_settings().embedding_dimension)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
async def postgres_app(test_env: dict[str, Any], postgres: PrivatePostgres) -> AsyncIterator[Any]:
    """The app with its vector database on the private PostgreSQL."""
    from atrium.app import create_app
    from atrium.config import get_settings, load_settings

    url = postgres.conninfo.replace("postgresql://", "postgresql+psycopg://", 1)
    app = create_app(load_settings(**{**get_settings().model_dump(), "vector_database_url": url}))
    async with LifespanManager(app, startup_timeout=60):
        yield app


#: The attempts a document may start before the claim fails it (production: 5).
MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def private_worker(
    test_env: dict[str, Any], postgres: PrivatePostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, str]]:
    """A prefork worker (one pool process, as production runs them) on a queue of its own,
    writing chunks to the private PostgreSQL; the session's worker never sees its jobs."""
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "TEST_WORKER_QUEUE": queue,
        "ATRIUM_VECTOR_DATABASE_URL": postgres.conninfo.replace(
            "postgresql://", "postgresql+psycopg://", 1
        ),
        "ATRIUM_INGESTION_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "ATRIUM_LOG_LEVEL": "INFO",
    }
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    worker = WorkerProcess(env, log, argv=["--pool=prefork", "--concurrency=1"])
    worker.start()
    try:
        yield worker, queue
    finally:
        worker.stop()


@pytest.fixture
def to_private_worker(private_worker: tuple[WorkerProcess, str]) -> Iterator[WorkerProcess]:
    """Jobs the app publishes during the test go to the private worker's queue."""
    from atrium.worker import celery_app

    worker, queue = private_worker
    saved = celery_app.conf.task_default_queue
    celery_app.conf.task_default_queue = queue
    try:
        yield worker
    finally:
        celery_app.conf.task_default_queue = saved


def _pool_process(worker: WorkerProcess, timeout: float = 60.0) -> psutil.Process:
    """The prefork pool's (only) process, once the main process has one."""
    assert worker.proc is not None
    main = psutil.Process(worker.proc.pid)
    deadline = time.monotonic() + timeout
    while not (children := main.children()):
        assert time.monotonic() < deadline, "the worker has no pool process"
        time.sleep(0.05)
    (child,) = children
    return child


def _kill_pool_process(worker: WorkerProcess) -> None:
    """SIGKILL the pool process, as the kernel's out-of-memory killer does."""
    child = _pool_process(worker)
    child.kill()
    child.wait(30)


async def _poll_document(
    client: httpx.AsyncClient, ctx: Any, doc_id: str, until: Any, timeout: float = 120.0
) -> dict[str, Any]:
    """Poll the document until ``until(body)``; fails if the deadline passes."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(f"{ctx.docs}/{doc_id}", headers=ctx.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if until(body):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"the document never got there: {body}")


async def _search(client: httpx.AsyncClient, ctx: Any, query: str) -> httpx.Response:
    return await client.post(
        f"/v1/tenants/{ctx.tenant.id}/search",
        json={"query": query},
        # The query's answer must come from the database, not from a cached result.
        headers={**ctx.headers, "Cache-Control": "no-store"},
    )


async def test_vector_database_stopped_searches_503_and_ingestion_retries_until_it_is_back(
    postgres: PrivatePostgres,
    postgres_app: Any,
    to_private_worker: WorkerProcess,
    clean_state: None,
) -> None:
    from tests.support.documents import prose, setup_tenant

    async with _client(postgres_app, 50013) as client:
        ctx = await setup_tenant(postgres_app, client)
        r = await client.post(
            ctx.docs, json={"title": "Before", "text": prose(300)}, headers=ctx.headers
        )
        before = r.json()["documents"][0]["id"]
        await _poll_document(client, ctx, before, lambda b: b["status"] == "ready")
        r = await _search(client, ctx, "the first document")
        assert r.status_code == 200 and r.json()["results"], r.text

        # The worker's pool process is replaced (as after a crash, or a recycling) and the
        # new one has not opened its connections yet when the database goes away.
        _kill_pool_process(to_private_worker)
        postgres.stop()
        for query in ("one", "two", "three"):
            _assert_outage(*await _timed(_search(client, ctx, query)), "vector database")

        # Uploading needs no vector database; processing does, at its last stage: the worker
        # puts the document back in the queue with a note, and retries it later.
        r = await client.post(
            ctx.docs, json={"title": "During", "text": prose(400)}, headers=ctx.headers
        )
        assert r.status_code == 202, r.text
        during = r.json()["documents"][0]["id"]
        # Kept down until the document has been retried more often than the worker may start
        # a document without finishing it (MAX_ATTEMPTS): those runs ended, in a retry, so
        # none of them counts as a crash.
        waiting = await _poll_document(
            client,
            ctx,
            during,
            lambda b: (
                b["status"] == "failed"
                or (
                    b["status"] == "queued"
                    and b["attempts"] == MAX_ATTEMPTS + 1
                    and (b["error"] or "").startswith("Retrying")
                )
            ),
        )
        assert waiting["status"] == "queued" and waiting["chunk_count"] == 0, waiting
        # What the tenant reads names the component, not the server's address.
        assert "temporary problem (the vector database was unavailable)" in waiting["error"]
        assert "127.0.0.1" not in waiting["error"] and "port" not in waiting["error"]

        postgres.start()
        # The pool reconnects at the first search, not after a backoff that grew during the
        # outage (psycopg_pool's default: up to minutes).
        r = await _search(client, ctx, "right after the restart")
        assert r.status_code == 200, r.text
        done = await _poll_document(
            client, ctx, during, lambda b: b["status"] != "queued" and b["status"] != "processing"
        )
        assert done["status"] == "ready", done
        assert done["attempts"] > MAX_ATTEMPTS + 1 and done["error"] is None

        # Both stores agree: every ready document has exactly its chunks, and no chunk belongs
        # to a document that is not ready.
        r = await client.get(ctx.docs, params={"size": 100}, headers=ctx.headers)
        documents = {uuid.UUID(d["id"]): d for d in r.json()["items"]}
        assert {d["status"] for d in documents.values()} == {"ready"}
        assert await postgres.chunks_per_document(ctx.tenant.id) == {
            doc_id: d["chunk_count"] for doc_id, d in documents.items()
        }
        r = await _search(client, ctx, "after the outage")
        assert r.status_code == 200, r.text
        assert {res["document_id"] for res in r.json()["results"]} <= {before, during}


async def test_a_pool_process_killed_mid_document_is_retried_then_fails_with_a_reason(
    postgres_app: Any, to_private_worker: WorkerProcess, clean_state: None
) -> None:
    """What the kernel does to a worker out of memory: SIGKILL to the pool process that grew.
    The main process sees the loss and, the task being acknowledged only when done
    (``task_acks_late`` + ``task_reject_on_worker_lost``), hands the message to a fresh pool
    process at once (not after the 2-hour visibility timeout). A document that kills every
    process that takes it ends ``failed`` with a reason once it has been started
    ``ATRIUM_INGESTION_MAX_ATTEMPTS`` times; it never stays in ``processing``."""
    from atrium.worker import celery_app
    from tests.support.documents import prose, setup_tenant

    # The per-child memory limit reaches Celery's setting (that Celery then replaces a pool
    # process over it after its task is Celery's own behaviour, not exercised here).
    limit_mb = postgres_app.state.settings.celery_max_memory_per_child_mb
    assert celery_app.conf.worker_max_memory_per_child == limit_mb * 1024

    async with _client(postgres_app, 50014) as client:
        ctx = await setup_tenant(postgres_app, client)
        r = await client.post(
            ctx.docs, json={"title": "Too big", "text": prose(12000)}, headers=ctx.headers
        )
        assert r.status_code == 202, r.text
        doc = r.json()["documents"][0]["id"]
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # Killed while it embeds (where a large document's memory goes), each time.
            await _poll_document(
                client,
                ctx,
                doc,
                lambda b, n=attempt: (
                    b["status"] == "processing" and b["stage"] == "embed" and b["attempts"] == n
                ),
            )
            _kill_pool_process(to_private_worker)

        failed = await _poll_document(client, ctx, doc, lambda b: b["status"] == "failed")
        assert failed["attempts"] == MAX_ATTEMPTS + 1 and failed["chunk_count"] == 0, failed
        assert f"started {MAX_ATTEMPTS} times without finishing" in failed["error"]
        assert "out of memory" in failed["error"] and "Split it" in failed["error"]
