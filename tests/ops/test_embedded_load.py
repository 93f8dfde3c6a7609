"""The load a person generates, on `atrium dev` as a new user runs it.

6 clients upload 20 documents of real prose each, one per request, while 3 clients search, on
the embedded default (SQLite account database, embedded PostgreSQL and Redis, the worker `atrium
dev` starts) and with the account database on MariaDB: no response >= 500, no transport error,
every document ``ready``, and the document and chunk counts exact (the collection's counters,
the documents' own, and the rows in the tenant's PostgreSQL partition all agree).

Before ``BEGIN IMMEDIATE`` and the writers' queue in ``kit/db.py`` about half of the uploads on
SQLite answered 500 ("database is locked").
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support import services
from tests.support.load import DevServer, login, prose_documents, run_load, sign_up

UPLOADERS = 6
# 120 documents: twice the 60 that reproduced the 500s (docs/decisions/0008); the 1,000-document
# figures come from bench/load.py, not from the suite, which must stay under 10 minutes.
PER_UPLOADER = 20
SEARCHERS = 3


def _partition_rows(data_dir: Path, tenant_id: str) -> tuple[int, int]:
    """(chunks, distinct documents) of the tenant in the embedded PostgreSQL."""
    with psycopg.connect(host=str(data_dir / "pgdata"), dbname="atrium", user="postgres") as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT document_id) FROM chunks WHERE tenant_id = %s",
            (uuid.UUID(tenant_id),),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.parametrize("account_db", ["sqlite", "mariadb"])
async def test_uploads_and_searches_under_load(tmp_path: Path, account_db: str) -> None:
    extra: dict[str, str] = {}
    database = ""
    if account_db == "mariadb":
        database = services.create_mysql_database()
        extra["ATRIUM_DATABASE_URL"] = (
            f"mysql+aiomysql://{services.MYSQL_USER}:{services.MYSQL_PASSWORD}@"
            f"{services.MYSQL_HOST}:{services.MYSQL_PORT}/{database}?charset=utf8mb4"
        )
    data_dir = tmp_path / "data"
    server = DevServer(data_dir, extra)
    try:
        server.start()
        server.create_superuser("ops@example.com")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            admin = await login(client, "ops@example.com")
            tenant = await sign_up(client, data_dir / "outbox", admin)
        docs = prose_documents(UPLOADERS * PER_UPLOADER, words=120)
        report = await run_load(
            server.url, tenant, docs, uploaders=UPLOADERS, searchers=SEARCHERS, ready_timeout=420
        )
        summary = report.summary()
        assert report.server_errors == 0, (summary, report.errors[:5], server.tail())
        assert not report.transport_errors, (summary, report.errors[:5])
        assert report.upload_statuses == {202: len(docs)}, summary
        assert report.search_statuses and set(report.search_statuses) == {200}, summary
        assert report.final_statuses == {"ready": len(docs)}, summary
        assert report.collection_documents == len(docs)
        assert report.chunks_by_document >= len(docs)
        assert report.collection_chunks == report.chunks_by_document
        assert _partition_rows(data_dir, tenant.tenant_id) == (report.chunks_by_document, len(docs))
    finally:
        server.stop()
        if database:
            services.drop_mysql_database(database)
