"""Quotas on the embedded SQLite account database: a request that writes rows and settles quota
in the same unit of work must not wait on SQLite's single write lock (its own transaction holds
it), and every settled figure must be recorded once the request commits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.support.factories import bearer, create_tenant, create_user
from tests.support.quota import usage_of

_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.I)


@dataclass
class OtherWrites:
    """Writes that other engines (the quota engine's own pool) made to the app's SQLite file."""

    #: Made while a transaction of the app's own engine had written and not yet ended.
    behind_open_writer: list[str] = field(default_factory=list)
    #: Made while no such transaction was open.
    clear: list[str] = field(default_factory=list)


@contextmanager
def other_writes(app: Any) -> Iterator[OtherWrites]:
    """Record :class:`OtherWrites` inside the block.

    A write behind an open writer waits for that transaction's write lock: when the
    transaction is the request that is itself waiting for the write, it can only end in
    "database is locked" (after the busy timeout, per retry).
    """
    main = app.state.engine.sync_engine
    database = main.url.database
    writing: set[int] = set()  # the app engine's connections inside a transaction that wrote
    seen = OtherWrites()

    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not _WRITE.match(statement):
            return
        if conn.engine is main:
            writing.add(id(conn))
        elif conn.engine.url.database == database:
            (seen.behind_open_writer if writing else seen.clear).append(statement)

    def ended(conn: Any) -> None:
        if conn.engine is main:
            writing.discard(id(conn))

    # On every engine (the quota engine is created on first use), ahead of the listeners that
    # take the lock, so that a write is seen before it waits.
    event.listen(Engine, "before_cursor_execute", before, insert=True)
    event.listen(Engine, "commit", ended)
    event.listen(Engine, "rollback", ended)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)
        event.remove(Engine, "commit", ended)
        event.remove(Engine, "rollback", ended)


async def test_multi_file_upload_on_sqlite_never_waits_on_itself_and_is_fully_metered(
    sqlite_app: Any,
) -> None:
    owner = await create_user(sqlite_app)
    tenant = await create_tenant(sqlite_app, owner)
    headers = await bearer(owner)
    transport = httpx.ASGITransport(app=sqlite_app, client=("127.0.0.1", 50003))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.post(
            f"/v1/tenants/{tenant.id}/collections", json={"name": "Lite"}, headers=headers
        )
        assert r.status_code == 201, r.text
        docs = f"/v1/tenants/{tenant.id}/collections/{r.json()['id']}/documents"
        contents = [f"Note {i}: the SQLite lock test. ".encode() * (20 + i) for i in range(3)]
        files = [("files", (f"n{i}.txt", c, "text/plain")) for i, c in enumerate(contents)]

        with other_writes(sqlite_app) as writes:
            r = await client.post(docs, files=files, headers=headers)
        assert r.status_code == 202, r.text
        # Before the fix each later file's quota write waited for the request's own write lock
        # (SQLite's busy timeout, and its retries): now they all come after its commit.
        assert writes.behind_open_writer == []
        assert writes.clear, "the quota writes were not seen at all"
        items = r.json()["documents"]
        assert len(items) == 3

        r = await client.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert usage_of(body, "documents")["used"] == 3
        assert usage_of(body, "stored_bytes")["used"] == sum(len(c) for c in contents)
        assert usage_of(body, "collections")["used"] == 1
        # Settled, not merely held: nothing is left reserved.
        assert usage_of(body, "documents")["reserved"] == 0
        assert usage_of(body, "stored_bytes")["reserved"] == 0

        # An adjustment made in a writing request (a deletion) is recorded after its commit.
        first = items[0]["id"]
        with other_writes(sqlite_app) as writes:
            r = await client.delete(f"{docs}/{first}", headers=headers)
        assert writes.behind_open_writer == []
        assert writes.clear, "the quota write was not seen at all"
        assert r.status_code in (200, 202, 204), r.text
        r = await client.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)
        body = r.json()
        assert usage_of(body, "documents")["used"] == 2
        assert usage_of(body, "stored_bytes")["used"] == sum(len(c) for c in contents[1:])


async def test_batched_settlements_on_sqlite(sqlite_app: Any) -> None:
    """Searches' batched settlements use SQLite's upsert dialect: several tenants and metrics
    in one batch, counted again on a second batch, with the day's figures."""
    from sqlalchemy import select

    from atrium.billing.quota import Metric, Quota
    from atrium.models.billing import UsageCounter, UsageDaily

    owner = await create_user(sqlite_app)
    a = await create_tenant(sqlite_app, owner)
    b = await create_tenant(sqlite_app, owner)
    quota = Quota.of(sqlite_app)
    for _ in range(2):
        for tenant, metric, n in ((a, Metric.searches, 3), (b, Metric.answers, 2)):
            for _ in range(n):
                await (await quota.reserve(tenant.id, metric, 1).acquire()).record_later()
        await (await quota.reserve(a.id, Metric.llm_tokens, 500).acquire()).record_later(120)
        await quota.flush()
    async with sqlite_app.state.sessionmaker() as s:
        counters = {
            (r.tenant_id, r.metric): (r.used, r.version)
            for r in (await s.execute(select(UsageCounter))).scalars()
            if r.tenant_id in (a.id, b.id)
        }
        daily = {
            (r.tenant_id, r.metric): r.value
            for r in (await s.execute(select(UsageDaily))).scalars()
            if r.tenant_id in (a.id, b.id)
        }
    assert counters[(a.id, "searches")] == (6, 2)
    assert counters[(b.id, "answers")] == (4, 2)
    assert counters[(a.id, "llm_tokens")] == (240, 2)
    assert daily[(a.id, "searches")] == 6
    assert daily[(a.id, "llm_tokens")] == 240
    figures = await quota.usage_of(a.id, Metric.searches)
    assert (figures.used, figures.reserved) == (6, 0)
