"""Quotas on the embedded SQLite account database: a request that writes rows and settles quota
in the same unit of work must not wait on SQLite's single write lock (its own transaction holds
it), and every settled figure must be recorded once the request commits."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.support.factories import bearer, create_tenant, create_user
from tests.test_quota_helpers import usage_of


async def test_multi_file_upload_on_sqlite_is_fast_and_fully_metered(sqlite_app: Any) -> None:
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

        started = time.monotonic()
        r = await client.post(docs, files=files, headers=headers)
        elapsed = time.monotonic() - started
        assert r.status_code == 202, r.text
        # Before the fix each later file waited SQLite's 30 s busy timeout (and its retries).
        assert elapsed < 20, f"upload of 3 files took {elapsed:.1f} s"
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
        r = await client.delete(f"{docs}/{first}", headers=headers)
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
