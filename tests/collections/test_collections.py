"""Collections through HTTP: create, list, change, names unique per tenant, metadata rules, and
deletion through the worker that leaves no document, chunk or file behind."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from atrium.kit.blobstore import get_blobstore
from atrium.models import Role
from tests.support.documents import (
    chunk_rows,
    drain_worker,
    hold_collection_lock,
    partition_count,
    prose,
    setup_tenant,
    usage_now,
    wait_document,
)
from tests.support.factories import add_member, bearer, create_tenant, create_user
from tests.support.files import make_pdf


async def _owner(app: Any) -> tuple[Any, dict[str, str], str]:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    return tenant, await bearer(owner), f"/v1/tenants/{tenant.id}/collections"


async def test_create_list_get_update(app: Any, client: httpx.AsyncClient) -> None:
    _, headers, url = await _owner(app)
    r = await client.post(
        url,
        json={"name": "  Handbook ", "description": "HR", "metadata": {"team": "hr"}},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "Handbook" and body["status"] == "active"
    assert body["metadata"] == {"team": "hr"}
    assert (body["document_count"], body["chunk_count"], body["total_bytes"]) == (0, 0, 0)
    cid = body["id"]
    for name in ("Wiki", "Tickets"):
        assert (await client.post(url, json={"name": name}, headers=headers)).status_code == 201
    r = await client.get(url, params={"size": 2}, headers=headers)
    assert r.status_code == 200
    page = r.json()
    assert page["total"] == 3 and [c["name"] for c in page["items"]] == ["Handbook", "Tickets"]
    r = await client.patch(
        f"{url}/{cid}", json={"name": "Staff handbook", "metadata": {}}, headers=headers
    )
    assert r.status_code == 200 and r.json()["name"] == "Staff handbook"
    assert r.json()["metadata"] == {} and r.json()["description"] == "HR"
    r = await client.get(f"{url}/{cid}", headers=headers)
    assert r.json()["name"] == "Staff handbook"


async def test_names_are_unique_per_tenant_regardless_of_case(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, headers, url = await _owner(app)
    assert (await client.post(url, json={"name": "Docs"}, headers=headers)).status_code == 201
    r = await client.post(url, json={"name": "docs"}, headers=headers)
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = await client.post(url, json={"name": "Other"}, headers=headers)
    other_id = r.json()["id"]
    r = await client.patch(f"{url}/{other_id}", json={"name": "DOCS"}, headers=headers)
    assert r.status_code == 409
    # Renaming to its own name in another case is fine.
    r = await client.patch(f"{url}/{other_id}", json={"name": "other"}, headers=headers)
    assert r.status_code == 200
    # Another tenant may use the same name.
    _, headers2, url2 = await _owner(app)
    assert (await client.post(url2, json={"name": "Docs"}, headers=headers2)).status_code == 201


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": ""}, "at least 1 character"),
        ({"name": "   "}, "at least 1 character"),
        ({"name": "x" * 201}, "at most 200 characters"),
        ({"name": "a", "metadata": [1]}, "must be a JSON object"),
        ({"name": "a", "metadata": {"k": {"deep": 1}}}, "nested objects are not allowed"),
        ({"name": "a", "metadata": {f"k{i}": i for i in range(33)}}, "at most 32"),
        ({"name": "a", "metadata": {"k": "x" * 1001}}, "longer than 1000"),
        ({"name": "a", "metadata": {"k": [{"a": 1}]}}, "may only list"),
        ({"name": "a", "unknown": 1}, "Extra inputs"),
    ],
)
async def test_bad_collection_bodies_get_422(
    app: Any, client: httpx.AsyncClient, body: dict[str, Any], words: str
) -> None:
    _, headers, url = await _owner(app)
    r = await client.post(url, json=body, headers=headers)
    assert r.status_code == 422, r.text
    assert words in str(r.json()["detail"])


async def test_permissions_and_isolation(app: Any, client: httpx.AsyncClient) -> None:
    tenant, headers, url = await _owner(app)
    cid = (await client.post(url, json={"name": "Docs"}, headers=headers)).json()["id"]
    viewer = await create_user(app)
    await add_member(app, tenant, viewer, Role.viewer)
    vh = await bearer(viewer)
    assert (await client.get(url, headers=vh)).status_code == 200
    assert (await client.get(f"{url}/{cid}", headers=vh)).status_code == 200
    r = await client.post(url, json={"name": "Mine"}, headers=vh)
    assert r.status_code == 403 and "collections:write" in r.text
    assert (await client.delete(f"{url}/{cid}", headers=vh)).status_code == 403
    assert (await client.patch(f"{url}/{cid}", json={}, headers=vh)).status_code == 403
    # Another tenant: 404 for the tenant path, and for this collection under its own path.
    _, headers2, url2 = await _owner(app)
    assert (await client.get(url, headers=headers2)).status_code == 404
    assert (await client.get(f"{url2}/{cid}", headers=headers2)).status_code == 404
    assert (await client.delete(f"{url2}/{cid}", headers=headers2)).status_code == 404
    assert (await client.get(f"{url2}/{uuid.uuid4()}", headers=headers2)).status_code == 404


async def test_delete_collection_removes_documents_chunks_and_files(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    ctx = await setup_tenant(app, client, "Doomed")
    keep = await setup_tenant(app, client, "Kept")
    files = [
        ("a.txt", prose(300).encode(), None),
        ("b.pdf", make_pdf([[f"Line {i} about the harbour" for i in range(30)]]), None),
    ]
    parts = [("files", (n, d)) for n, d, _ in files]
    r = await client.post(ctx.docs, files=parts, headers=ctx.headers)
    docs = r.json()["documents"]
    r = await client.post(keep.docs, json={"text": prose(200)}, headers=keep.headers)
    kept_doc = r.json()["documents"][0]
    for doc in docs:
        assert (await wait_document(client, ctx, doc["id"]))["status"] == "ready"
    assert (await wait_document(client, keep, kept_doc["id"]))["status"] == "ready"
    r = await client.get(ctx.base, headers=ctx.headers)
    assert r.json()["document_count"] == 2 and r.json()["chunk_count"] > 0

    # While one more large document is being processed (its run held at its store stage, as
    # a deletion's lock would hold it), delete the collection.
    async with (
        hold_collection_lock(settings, ctx.collection_id) as lock,
        hold_collection_lock(settings, keep.collection_id) as next_lock,
    ):
        r = await client.post(ctx.docs, json={"text": prose(3500)}, headers=ctx.headers)
        late = r.json()["documents"][0]
        await lock.wait_for_writer()
        r = await client.get(f"{ctx.docs}/{late['id']}", headers=ctx.headers)
        assert (r.json()["status"], r.json()["stage"]) == ("processing", "store")
        # The next task: the other tenant's document (its run stops at its store stage too);
        # then the deletion's. Between the two, what the late run left can be seen before the
        # deletion task cleans up (which would hide chunks written after the deletion).
        r = await client.post(keep.docs, json={"text": prose(50)}, headers=keep.headers)
        assert r.status_code == 202, r.text
        r = await client.delete(ctx.base, headers=ctx.headers)
        assert r.status_code == 202 and r.json()["status"] == "deleting"
        # The name is free at once; the doomed collection takes no more uploads.
        r = await client.post(
            f"/v1/tenants/{ctx.tenant.id}/collections",
            json={"name": "doomed"},
            headers=ctx.headers,
        )
        assert r.status_code == 201
        r = await client.post(ctx.docs, json={"text": "more"}, headers=ctx.headers)
        assert r.status_code == 409 and "being deleted" in r.json()["detail"]
        assert (
            await client.patch(ctx.base, json={"name": "x"}, headers=ctx.headers)
        ).status_code == 409
        await lock.release()
        # The worker runs one task at a time: the next run waiting means the late one ended.
        await next_lock.wait_for_writer()
        assert await chunk_rows(settings, late["id"]) == []
        r = await client.get(f"{ctx.docs}/{late['id']}", headers=ctx.headers)
        assert (r.json()["status"], r.json()["chunk_count"]) == ("processing", 0)
        assert (await client.get(ctx.base, headers=ctx.headers)).json()["status"] == "deleting"
        await next_lock.release()
        await drain_worker(app)

    assert (await client.get(ctx.base, headers=ctx.headers)).status_code == 404
    for doc in [*docs, late]:
        assert await chunk_rows(settings, doc["id"]) == []
    assert await partition_count(settings, ctx.tenant.id) == 0
    blobs = get_blobstore(settings)
    for doc in docs:
        with pytest.raises(FileNotFoundError):
            await blobs.get(
                f"tenants/{ctx.tenant.id}/collections/{ctx.collection_id}/documents/{doc['id']}"
            )
    assert (await client.get(f"{ctx.docs}/{docs[0]['id']}", headers=ctx.headers)).status_code == 404
    # Nothing of the collection counts any more (the late document included), nothing stays held.
    for metric in ("documents", "stored_bytes", "chunks"):
        assert await usage_now(client, ctx, metric) == (0, 0), metric
    # The other tenant's collection is untouched.
    assert len(await chunk_rows(settings, kept_doc["id"])) > 0
