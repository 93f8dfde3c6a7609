"""Plan limits on collections, documents, stored bytes, uploads, chunks and embedding tokens,
through HTTP and the real Celery worker."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.documents import drain_worker, prose, setup_tenant, wait_document
from tests.support.quota import set_plan, superuser_headers, usage_of


async def _usage(client: httpx.AsyncClient, ctx: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/tenants/{ctx.tenant.id}/usage", headers=ctx.headers)
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


async def test_collections_are_counted(app: Any, client: httpx.AsyncClient) -> None:
    ctx = await setup_tenant(app, client)
    await set_plan(client, await superuser_headers(app), ctx.tenant.id, "free", {"collections": 2})
    url = f"/v1/tenants/{ctx.tenant.id}/collections"
    r = await client.post(url, json={"name": "Two"}, headers=ctx.headers)
    assert r.status_code == 201
    second = r.json()["id"]
    refused = await client.post(url, json={"name": "Three"}, headers=ctx.headers)
    assert refused.status_code == 402
    assert refused.json()["detail"]["metric"] == "collections"
    # A name taken is still a 409, not a quota error (the name is checked before the plan's
    # limit is held), and holds nothing.
    taken = await client.post(url, json={"name": "Two"}, headers=ctx.headers)
    assert taken.status_code == 409, taken.text
    assert "already exists" in taken.json()["detail"]
    collections = usage_of(await _usage(client, ctx), "collections")
    assert (collections["used"], collections["reserved"]) == (2, 0)
    # Deleting a collection is accepted (the worker removes what it held): 202.
    r = await client.delete(f"{url}/{second}", headers=ctx.headers)
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    assert usage_of(await _usage(client, ctx), "collections")["used"] == 1
    assert (await client.post(url, json={"name": "Three"}, headers=ctx.headers)).status_code == 201


async def test_documents_bytes_and_upload_size(app: Any, client: httpx.AsyncClient) -> None:
    ctx = await setup_tenant(app, client)
    admin = await superuser_headers(app)
    await set_plan(client, admin, ctx.tenant.id, "free", {"documents": 2, "max_upload_bytes": 5000})
    first, second = "Alpha. " + prose(40), "Beta. " + prose(40)
    r1 = await client.post(ctx.docs, json={"text": first}, headers=ctx.headers)
    assert r1.status_code == 202, r1.text
    r2 = await client.post(ctx.docs, json={"text": second}, headers=ctx.headers)
    assert r2.status_code == 202
    # A duplicate is not a new document: no quota needed.
    assert (
        await client.post(ctx.docs, json={"text": first}, headers=ctx.headers)
    ).status_code == 200
    refused = await client.post(ctx.docs, json={"text": "Gamma. " + prose(40)}, headers=ctx.headers)
    assert refused.status_code == 402
    assert refused.json()["detail"]["metric"] == "documents"
    usage = await _usage(client, ctx)
    sizes = [r1.json()["documents"][0]["size_bytes"], r2.json()["documents"][0]["size_bytes"]]
    assert usage_of(usage, "documents")["used"] == 2
    assert usage_of(usage, "stored_bytes")["used"] == sum(sizes)

    doc_id = r1.json()["documents"][0]["id"]
    r = await client.delete(f"{ctx.docs}/{doc_id}", headers=ctx.headers)
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    usage = await _usage(client, ctx)
    assert usage_of(usage, "documents")["used"] == 1
    assert usage_of(usage, "stored_bytes")["used"] == sizes[1]

    # The plan's largest upload applies, to the byte: 5001 bytes are refused (before any
    # quota is held), exactly 5000 are taken.
    text = (prose(1000) * 2)[:5001]
    too_big = await client.post(ctx.docs, json={"text": text}, headers=ctx.headers)
    assert too_big.status_code == 413, too_big.text
    detail = too_big.json()["detail"]
    assert "The text is 5,001 bytes; the largest upload allowed is 5,000 bytes" in detail
    assert usage_of(await _usage(client, ctx), "documents") == usage_of(usage, "documents")
    at_limit = await client.post(ctx.docs, json={"text": text[:5000]}, headers=ctx.headers)
    assert at_limit.status_code == 202, at_limit.text
    assert at_limit.json()["documents"][0]["size_bytes"] == 5000
    # The usage report names the limit that was just enforced.
    usage = await _usage(client, ctx)
    assert usage["max_upload_bytes"] == 5000
    assert usage_of(usage, "documents")["used"] == 2
    assert usage_of(usage, "stored_bytes")["used"] == sizes[1] + 5000


async def test_chunks_and_embedding_tokens_are_metered_by_the_worker(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    ctx = await setup_tenant(app, client)
    r = await client.post(ctx.docs, json={"text": prose(900)}, headers=ctx.headers)
    assert r.status_code == 202
    doc = await wait_document(client, ctx, r.json()["documents"][0]["id"])
    assert doc["status"] == "ready", doc
    usage = await _usage(client, ctx)
    assert usage_of(usage, "chunks")["used"] == doc["chunk_count"] > 1
    assert usage_of(usage, "embedding_tokens")["used"] == doc["token_count"] > 0

    # Re-indexing replaces the chunks (no double count) but embeds again (tokens count).
    r = await client.post(f"{ctx.docs}/{doc['id']}/reindex", headers=ctx.headers)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    again = await wait_document(client, ctx, doc["id"])
    assert again["status"] == "ready"
    usage = await _usage(client, ctx)
    assert usage_of(usage, "chunks")["used"] == again["chunk_count"]
    assert usage_of(usage, "embedding_tokens")["used"] == doc["token_count"] + again["token_count"]

    # Over the chunk limit: the document fails with a reason, and holds nothing.
    admin = await superuser_headers(app)
    await set_plan(client, admin, ctx.tenant.id, "free", {"chunks": again["chunk_count"] + 1})
    r = await client.post(ctx.docs, json={"text": prose(700)}, headers=ctx.headers)
    failed = await wait_document(client, ctx, r.json()["documents"][0]["id"])
    assert failed["status"] == "failed"
    assert "chunks" in failed["error"] and "plan" in failed["error"]
    usage = await _usage(client, ctx)
    assert usage_of(usage, "chunks")["used"] == again["chunk_count"]
    assert usage_of(usage, "chunks")["reserved"] == 0

    # Deleting the ready document gives its chunks back.
    r = await client.delete(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)
    assert r.status_code == 202
    assert usage_of(await _usage(client, ctx), "chunks")["used"] == 0

    # Deleting the collection gives back what its remaining documents held (by the worker).
    assert usage_of(await _usage(client, ctx), "documents")["used"] == 1  # the failed one
    r = await client.delete(ctx.base, headers=ctx.headers)
    assert r.status_code == 202
    await drain_worker(app)
    usage = await _usage(client, ctx)
    assert [usage_of(usage, m)["used"] for m in ("documents", "stored_bytes", "chunks")] == [
        0,
        0,
        0,
    ]
    assert usage_of(usage, "collections")["used"] == 0
