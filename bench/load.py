"""Load as a person generates it: concurrent one-file uploads while others search, on the
embedded default (SQLite account database) and on MariaDB, side by side.

    .venv/bin/python bench/load.py             # 1,000 documents each, into docs/performance.md
    .venv/bin/python bench/load.py --docs 240 --no-write

Each run starts ``atrium dev`` exactly as ``./scripts/run`` does (a fresh data directory, the
API, a Celery worker and beat, embedded PostgreSQL and Redis); the MariaDB run only points
``ATRIUM_DATABASE_URL`` at a fresh database on 127.0.0.1:3306 (and keeps the embedded Redis).
A user registers, verifies through the outbox, makes a key and a collection; then
``--uploaders`` clients each upload their share of the documents one request at a time while
``--searchers`` clients search in a loop until every document is ``ready`` or ``failed``.
Printed (and written to ``docs/performance.md``): uploads/s, documents ready/s, search p50/p99
under ingestion, responses >= 500, transport errors, final document states and chunk counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from _perfdoc import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.load import DevServer, login, prose_documents, run_load, sign_up  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
SECTION = "## Load on the embedded default"


async def _one(name: str, extra: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"atrium-load-{name}-")) / "data"
    server = DevServer(data_dir, extra)
    server.start()
    try:
        server.create_superuser("ops@example.com")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            admin = await login(client, "ops@example.com")
            tenant = await sign_up(client, data_dir / "outbox", admin)
        docs = prose_documents(args.docs)
        report = await run_load(
            server.url, tenant, docs, uploaders=args.uploaders, searchers=args.searchers
        )
        summary = report.summary()
        summary["chunks"] = report.collection_chunks
        summary["chunks_match"] = report.collection_chunks == report.chunks_by_document
        summary["documents_counted"] = report.collection_documents
        summary["first_errors"] = report.errors[:5]
        return summary
    finally:
        server.stop()


def _markdown(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    rows = [
        ("uploads/s (one file per request)", "uploads_per_s"),
        ("documents ready/s", "ready_per_s"),
        ("search p50 under ingestion (ms)", "search_p50_ms"),
        ("search p99 under ingestion (ms)", "search_p99_ms"),
        ("searches", "searches"),
        ("responses >= 500", "responses_5xx"),
        ("transport errors", "transport_errors"),
        ("final states", "final_statuses"),
        ("chunks (collection = sum of documents)", "chunks"),
    ]
    names = list(results)
    lines = [
        SECTION,
        "",
        f"`bench/load.py --docs {args.docs}`: `atrium dev` as `./scripts/run` starts it, "
        f"{args.uploaders} clients uploading one Markdown passage of real prose per request "
        f"({args.docs} in all) while {args.searchers} clients search in a loop, until every "
        "document is `ready`; the same run with the account database on the local MariaDB. "
        f"2-core machine, measured {time.strftime('%Y-%m-%d')}.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, key in rows:
        cells = []
        for n in names:
            value = results[n].get(key)
            if key == "chunks":
                value = f"{value} ({'match' if results[n]['chunks_match'] else 'MISMATCH'})"
            elif isinstance(value, dict):
                value = ", ".join(f"{k}: {v}" for k, v in sorted(value.items()))
            cells.append(str(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_doc(section: str) -> None:
    write_section(SECTION, section, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--uploaders", type=int, default=6)
    parser.add_argument("--searchers", type=int, default=3)
    parser.add_argument("--only", choices=["sqlite", "mariadb"], default=None)
    parser.add_argument("--mysql", default="mysql+aiomysql://root@127.0.0.1:3306")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/performance.md")
    args = parser.parse_args()

    results: dict[str, dict[str, Any]] = {}
    if args.only in (None, "sqlite"):
        results["SQLite (embedded default)"] = asyncio.run(_one("sqlite", {}, args))
        print(json.dumps(results, indent=2))
    if args.only in (None, "mariadb"):
        import pymysql

        db = f"atrium_load_{uuid.uuid4().hex[:8]}"
        conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{db}` CHARACTER SET utf8mb4")
        try:
            extra = {"ATRIUM_DATABASE_URL": f"{args.mysql}/{db}?charset=utf8mb4"}
            results["MariaDB"] = asyncio.run(_one("mariadb", extra, args))
        finally:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
    print(json.dumps(results, indent=2))
    section = _markdown(results, args)
    print(section)
    if not args.no_write and args.only is None:
        _write_doc(section)


if __name__ == "__main__":
    main()
