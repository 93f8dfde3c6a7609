"""Documents through HTTP and a real Celery worker: every format to ``ready``, with chunks in the
tenant's partition only; every bad input refused with its 4xx; duplicates, re-index, delete."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import select

from atrium.ingestion.detect import DOCX
from atrium.ingestion.service import PROCESS_TASK
from atrium.kit.blobstore import get_blobstore
from atrium.kit.cache_versions import collection_versions
from atrium.kit.vectordb import partition_name
from atrium.models import Role
from atrium.models.outbox import OutboxJob
from tests.support.documents import (
    chunk_rows,
    drain_worker,
    hold_collection_lock,
    partition_count,
    prose,
    queued_jobs,
    setup_tenant,
    upload_files,
    usage_now,
    wait_document,
)
from tests.support.factories import add_member, bearer, create_user
from tests.support.files import (
    PNG,
    encrypt_pdf,
    make_docx,
    make_image_only_pdf,
    make_pdf,
)

# Tests -------------------------------------------------------------------------------------


FORMATS = [
    ("notes.txt", prose(400).encode(), "text/plain", "text/plain"),
    (
        "guide.md",
        ("# Guide\n\n## Part one\n\n" + prose(300) + "\n\n## Part two\n\n" + prose(300)).encode(),
        "text/markdown",
        "text/markdown",
    ),
    (
        "page.html",
        f"<html><head><title>Page</title></head><body><h1>Intro</h1><p>{prose(300)}</p>"
        "</body></html>".encode(),
        None,
        "text/html",
    ),
    (
        "report.pdf",
        make_pdf([[f"Line {i} of the report about rainfall" for i in range(40)]] * 3),
        "application/pdf",
        "application/pdf",
    ),
    ("policy.docx", make_docx(paragraphs=12), None, DOCX),
]


async def test_every_format_becomes_ready_in_the_tenants_partition_only(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    ctx = await setup_tenant(app, client)
    other = await setup_tenant(app, client, "Other")
    before = (
        await collection_versions(app.state.redis, ctx.tenant.id, [uuid.UUID(ctx.collection_id)])
    )[0]
    r = await upload_files(
        client,
        ctx,
        [(name, data, ctype) for name, data, ctype, _ in FORMATS],
        metadata='{"source": "tests", "year": 2024}',
    )
    assert r.status_code == 202, r.text
    uploaded = r.json()["documents"]
    assert [d["status"] for d in uploaded] == ["queued"] * len(FORMATS)
    assert [d["content_type"] for d in uploaded] == [f[3] for f in FORMATS]
    assert not any(d["duplicate"] for d in uploaded)
    # Also one JSON text in the other tenant, which must keep its chunks to itself.
    r = await client.post(
        other.docs, json={"title": "Other text", "text": prose(200)}, headers=other.headers
    )
    assert r.status_code == 202, r.text
    other_doc = r.json()["documents"][0]

    finals: dict[str, dict[str, Any]] = {}
    for doc in uploaded:
        final = await wait_document(client, ctx, doc["id"])
        finals[doc["filename"]] = final
        assert final["status"] == "ready", final
        # A document seen ready has already moved the collection's cache version (bumped
        # right after its chunks commit; once per collection for the documents a task
        # processed together), so no search can be answered from a stale entry.
        now = await collection_versions(
            app.state.redis, ctx.tenant.id, [uuid.UUID(ctx.collection_id)]
        )
        assert now[0] > before
        assert final["progress"] == 100 and final["stage"] is None
        assert final["chunk_count"] >= 1 and final["token_count"] > 0
        assert {"extract_ms", "chunk_ms", "embed_ms", "store_ms", "total_ms"} <= set(
            final["timings"]
        )
        rows = await chunk_rows(settings, doc["id"])
        assert {part for part, _, _ in rows} == {partition_name(ctx.tenant.id)}
        assert [ordinal for _, ordinal, _ in rows] == list(range(final["chunk_count"]))
    final_other = await wait_document(client, other, other_doc["id"])
    assert final_other["status"] == "ready"
    other_rows = await chunk_rows(settings, other_doc["id"])
    assert {part for part, _, _ in other_rows} == {partition_name(other.tenant.id)}
    assert await partition_count(settings, other.tenant.id) == final_other["chunk_count"]

    # Until read, a document is named after its file; then its own title replaces the name.
    assert all(d["title"] == d["filename"] for d in uploaded)
    # Titles come from the documents themselves; metadata and title ride on every chunk.
    titles = {name: final["title"] for name, final in finals.items()}
    assert titles["guide.md"] == "Guide" and titles["page.html"] == "Page"
    assert titles["report.pdf"] == "Quarterly report" and titles["notes.txt"] == "notes.txt"
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT metadata FROM chunks WHERE document_id = %s",
            (uuid.UUID(uploaded[1]["id"]),),
        )
        assert [r[0] for r in await cur.fetchall()] == [
            {"source": "tests", "year": 2024, "title": "Guide"}
        ]
    # The completed uploads moved the collection's cache version (once per task at least).
    after = (
        await collection_versions(app.state.redis, ctx.tenant.id, [uuid.UUID(ctx.collection_id)])
    )[0]
    assert after > before
    # The collection adds it all up.
    r = await client.get(ctx.base, headers=ctx.headers)
    body = r.json()
    assert body["document_count"] == len(FORMATS)
    assert body["chunk_count"] == await partition_count(settings, ctx.tenant.id)
    assert body["total_bytes"] == sum(len(f[1]) for f in FORMATS)
    # Listing, filtered by status.
    r = await client.get(ctx.docs, params={"status": "ready", "size": 2}, headers=ctx.headers)
    assert r.status_code == 200
    assert r.json()["total"] == len(FORMATS) and len(r.json()["items"]) == 2
    r = await client.get(ctx.docs, params={"status": "failed"}, headers=ctx.headers)
    assert r.json()["total"] == 0


async def test_json_text_and_duplicates(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    ctx = await setup_tenant(app, client)
    text = "# Release notes\n\n" + prose(150)
    r = await client.post(ctx.docs, json={"text": text, "metadata": {"v": 2}}, headers=ctx.headers)
    assert r.status_code == 202, r.text
    first = r.json()["documents"][0]
    # Its first line until read, then its first heading.
    assert first["title"] == "# Release notes" and first["content_type"] == "text/markdown"
    assert first["metadata"] == {"v": 2}
    # The same bytes again (as JSON or as a file): the existing document, 200, no new work.
    r = await client.post(ctx.docs, json={"text": text}, headers=ctx.headers)
    assert r.status_code == 200
    assert r.json()["documents"][0]["id"] == first["id"]
    assert r.json()["documents"][0]["duplicate"] is True
    r = await upload_files(client, ctx, [("notes.md", text.encode(), None)])
    assert r.status_code == 200 and r.json()["documents"][0]["id"] == first["id"]
    # Twice in one request, next to a new file: one new document, one duplicate → 202.
    new = prose(50).encode()
    r = await upload_files(client, ctx, [("a.txt", new, None), ("b.txt", new, None)])
    assert r.status_code == 202
    a, b = r.json()["documents"]
    assert a["id"] == b["id"] and (a["duplicate"], b["duplicate"]) == (False, True)
    # Another collection does not share documents.
    r = await client.post(
        f"/v1/tenants/{ctx.tenant.id}/collections", json={"name": "Second"}, headers=ctx.headers
    )
    second = r.json()["id"]
    r = await client.post(
        f"/v1/tenants/{ctx.tenant.id}/collections/{second}/documents",
        json={"text": text},
        headers=ctx.headers,
    )
    assert r.status_code == 202 and r.json()["documents"][0]["id"] != first["id"]
    ready = await wait_document(client, ctx, first["id"])
    assert ready["status"] == "ready" and ready["title"] == "Release notes"


BAD_UPLOADS = [
    # (files, form fields, status, words in the detail)
    ([("empty.txt", b"", None)], {}, 422, "empty"),
    ([("blank.txt", b"   \n  ", None)], {}, 422, "only whitespace"),
    ([("latin.txt", "Café crème brûlée".encode("latin-1"), None)], {}, 422, "not valid UTF-8"),
    ([("pic.png", PNG, None)], {}, 415, "image/png"),
    ([("pic.txt", PNG, "text/plain")], {}, 415, "image/png"),
    ([("a.pdf", b"hello there", "application/pdf")], {}, 415, "sent as application/pdf"),
    ([("x.txt", make_pdf([["text"]]), "text/plain")], {}, 415, "its content is a PDF"),
    ([("ok.txt", b"fine words", None)], {"metadata": "[1, 2]"}, 422, "must be a JSON object"),
    ([("ok.txt", b"fine words", None)], {"metadata": "{not json"}, 422, "not valid JSON"),
    (
        [("ok.txt", b"fine words", None)],
        {"metadata": '{"a": {"nested": 1}}'},
        422,
        "nested objects are not allowed",
    ),
    (
        [("ok.txt", b"fine words", None)],
        {
            "metadata": '{"big": "'
            + "x" * 900
            + '", '
            + ", ".join(f'"k{i}": "{"y" * 300}"' for i in range(30))
            + "}"
        },
        422,
        "at most 8192",
    ),
    (
        [("ok.txt", b"fine words", None), ("two.txt", b"other words", None)],
        {"title": "One title"},
        422,
        "single file",
    ),
    # One bad file refuses the whole request, naming it.
    ([("good.txt", b"fine words", None), ("bad.png", PNG, None)], {}, 415, "File 'bad.png'"),
]


@pytest.mark.parametrize(("files", "fields", "status", "words"), BAD_UPLOADS)
async def test_bad_uploads_get_a_4xx_that_says_why(
    app: Any,
    client: httpx.AsyncClient,
    files: list[tuple[str, bytes, str | None]],
    fields: dict[str, str],
    status: int,
    words: str,
) -> None:
    ctx = await setup_tenant(app, client)
    r = await upload_files(client, ctx, files, **fields)
    assert r.status_code == status, r.text
    assert words in str(r.json()["detail"]), r.json()
    r = await client.get(ctx.docs, headers=ctx.headers)
    assert r.json()["total"] == 0


# Found only by parsing, which happens in the worker (the API only sniffs uploads): accepted,
# then ``failed`` with the reason.
UNREADABLE_UPLOADS = [
    ("locked.pdf", encrypt_pdf(make_pdf([["t"]]), "pw"), "encrypted"),
    ("scan.pdf", make_image_only_pdf(), "without extractable text"),
    ("bad.pdf", b"%PDF-1.7 garbage", "could not be read as a PDF"),
    ("empty.html", b"<html><body></body></html>", "without any text"),
]


async def test_unreadable_files_end_failed_with_the_reason(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    ctx = await setup_tenant(app, client)
    r = await upload_files(
        client, ctx, [(name, data, None) for name, data, _ in UNREADABLE_UPLOADS]
    )
    assert r.status_code == 202, r.text
    for doc, (name, _, words) in zip(r.json()["documents"], UNREADABLE_UPLOADS, strict=True):
        final = await wait_document(client, ctx, doc["id"])
        assert final["status"] == "failed", final
        assert words in final["error"] and "The document" in final["error"], (name, final)
        assert final["attempts"] == 1 and final["chunk_count"] == 0


async def test_bad_json_and_other_bodies(app: Any, client: httpx.AsyncClient) -> None:
    ctx = await setup_tenant(app, client)
    cases: list[tuple[bytes, int, str]] = [
        (b'{"text": ""}', 422, "at least 1 character"),
        (b'{"text": "   "}', 422, "only whitespace"),
        (b'{"text": "fine", "metadata": ["a"]}', 422, "must be a JSON object"),
        (b'{"text": "fine", "metadata": {"k": NaN}}', 422, "finite number"),
        (b'{"title": "x"}', 422, "Field required"),
        (b'{"text": "fine", "extra": 1}', 422, "Extra inputs"),
        (b'{"text": ', 422, "JSON"),
    ]
    for body, status, words in cases:
        r = await client.post(
            ctx.docs, content=body, headers={**ctx.headers, "content-type": "application/json"}
        )
        assert r.status_code == status, (body, r.text)
        assert words in str(r.json()["detail"]), r.json()
    r = await client.post(
        ctx.docs, content=b"raw text", headers={**ctx.headers, "content-type": "text/plain"}
    )
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    # A form that is not multipart (httpx sends ``data`` alone url-encoded): the type is wrong.
    r = await client.post(ctx.docs, data={"metadata": "{}"}, headers=ctx.headers)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    # Multipart, but without a file: the type is right and the content is not.
    r = await client.post(ctx.docs, files={"metadata": (None, "{}")}, headers=ctx.headers)
    assert r.request.headers["content-type"].startswith("multipart/form-data")
    assert r.status_code == 422 and "one or more files" in r.json()["detail"]


async def test_too_large_uploads_get_413(app: Any, client: httpx.AsyncClient) -> None:
    from tests.support.quota import set_plan, superuser_headers

    ctx = await setup_tenant(app, client)
    admin = await superuser_headers(app)
    await set_plan(client, admin, ctx.tenant.id, "free", {"max_upload_bytes": 4096})
    r = await upload_files(client, ctx, [("big.txt", b"word " * 1000, None)])
    assert r.status_code == 413, r.text
    assert "largest upload allowed is 4.0 KB" in r.json()["detail"]
    r = await client.post(ctx.docs, json={"text": "word " * 1000}, headers=ctx.headers)
    assert r.status_code == 413
    r = await client.post(ctx.docs, json={"text": "word " * 100}, headers=ctx.headers)
    assert r.status_code == 202


async def test_delete_document_removes_chunks_and_file(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    ctx = await setup_tenant(app, client)
    data = make_docx(paragraphs=20)
    r = await upload_files(client, ctx, [("policy.docx", data, None)])
    doc = r.json()["documents"][0]
    ready = await wait_document(client, ctx, doc["id"])
    assert ready["status"] == "ready" and len(await chunk_rows(settings, doc["id"])) > 0
    key = f"tenants/{ctx.tenant.id}/collections/{ctx.collection_id}/documents/{doc['id']}"
    assert await get_blobstore(settings).get(key) == data
    version = (
        await collection_versions(app.state.redis, ctx.tenant.id, [uuid.UUID(ctx.collection_id)])
    )[0]

    r = await client.delete(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    assert (await wait_document(client, ctx, doc["id"], until=("gone",)))["status"] == "gone"
    assert await chunk_rows(settings, doc["id"]) == []
    with pytest.raises(FileNotFoundError):
        await get_blobstore(settings).get(key)
    assert (
        await collection_versions(app.state.redis, ctx.tenant.id, [uuid.UUID(ctx.collection_id)])
    )[0] > version
    # The same file can come back as a new document.
    r = await upload_files(client, ctx, [("policy.docx", data, None)])
    assert r.status_code == 202 and r.json()["documents"][0]["id"] != doc["id"]


async def test_delete_while_processing_leaves_no_chunk(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    ctx = await setup_tenant(app, client)
    # Another tenant's document, to queue behind the run (see below).
    other = await setup_tenant(app, client, "Next")
    async with (
        hold_collection_lock(settings, ctx.collection_id) as lock,
        hold_collection_lock(settings, other.collection_id) as next_lock,
    ):
        # Large enough (over stages.LARGE_TEXT_CHARS) that the run records every stage.
        r = await client.post(ctx.docs, json={"text": prose(3500)}, headers=ctx.headers)
        assert r.status_code == 202, r.text
        doc = r.json()["documents"][0]
        # The run has embedded everything and waits to write its chunks.
        await lock.wait_for_writer()
        body = (await client.get(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)).json()
        assert (body["status"], body["stage"], body["attempts"]) == ("processing", "store", 1)
        # What the run holds: its embedding tokens (spent) and its chunks (not yet written).
        tokens_used, tokens_reserved = await usage_now(client, ctx, "embedding_tokens")
        spent = tokens_used + tokens_reserved
        assert spent > 0 and (await usage_now(client, ctx, "chunks"))[1] > 0

        # The next task is the other document's (it will stop at its store stage too), then
        # the deletion's: between the two, what the run left can be seen before the deletion
        # task cleans up (which would hide chunks written after the deletion).
        r = await client.post(other.docs, json={"text": prose(50)}, headers=other.headers)
        assert r.status_code == 202, r.text
        r = await client.delete(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)
        assert r.status_code == 202 and r.json()["status"] == "deleting"
        await lock.release()
        # The worker runs one task at a time: the next run waiting means this one has ended.
        await next_lock.wait_for_writer()
        assert await chunk_rows(settings, doc["id"]) == []
        body = (await client.get(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)).json()
        assert (body["status"], body["chunk_count"]) == ("deleting", 0)
        await next_lock.release()
        await drain_worker(app)
    assert await chunk_rows(settings, doc["id"]) == []
    assert await partition_count(settings, ctx.tenant.id) == 0
    # The row is gone, not brought back by the run.
    r = await client.get(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)
    assert r.status_code == 404
    assert (await client.get(ctx.docs, headers=ctx.headers)).json()["total"] == 0
    # Usage: the embedding was spent and is counted once; nothing else is, nothing stays held.
    assert await usage_now(client, ctx, "embedding_tokens") == (spent, 0)
    for metric in ("documents", "stored_bytes", "chunks"):
        assert await usage_now(client, ctx, metric) == (0, 0), metric


async def test_reindex_replaces_chunks_exactly(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    ctx = await setup_tenant(app, client)
    r = await client.post(ctx.docs, json={"text": prose(900)}, headers=ctx.headers)
    doc = r.json()["documents"][0]
    first = await wait_document(client, ctx, doc["id"])
    rows = await chunk_rows(settings, doc["id"])
    assert first["attempts"] == 1
    # Another collection's document keeps the worker busy (held at its store stage), so that
    # the re-index stays queued while it is asked for again.
    r = await client.post(
        f"/v1/tenants/{ctx.tenant.id}/collections", json={"name": "Busy"}, headers=ctx.headers
    )
    busy = r.json()["id"]
    async with hold_collection_lock(settings, busy) as lock:
        r = await client.post(
            f"/v1/tenants/{ctx.tenant.id}/collections/{busy}/documents",
            json={"text": prose(50)},
            headers=ctx.headers,
        )
        assert r.status_code == 202, r.text
        await lock.wait_for_writer()
        r = await client.post(f"{ctx.docs}/{doc['id']}/reindex", headers=ctx.headers)
        assert r.status_code == 202 and r.json()["status"] == "queued"
        queued = r.json()
        assert (queued["attempts"], queued["progress"], queued["error"]) == (0, 0, None)
        # A second request while queued changes nothing: the same row, one job on the broker.
        r = await client.post(f"{ctx.docs}/{doc['id']}/reindex", headers=ctx.headers)
        assert r.status_code == 202 and r.json() == queued
        assert (await client.get(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)).json() == queued
        assert await queued_jobs(settings, PROCESS_TASK, document_id=doc["id"]) == 1
        async with app.state.sessionmaker() as session:
            left = await session.scalars(select(OutboxJob.kwargs))
            assert [k for k in left if k.get("document_id") == doc["id"]] == []
        await lock.release()
        second = await wait_document(client, ctx, doc["id"])
    # Claimed once (a second job would have found it ready and done nothing).
    assert second["status"] == "ready" and second["attempts"] == 1
    assert second["chunk_count"] == first["chunk_count"]
    again = await chunk_rows(settings, doc["id"])
    assert [(o, t) for _, o, t in again] == [(o, t) for _, o, t in rows]


async def test_roles_and_other_tenants(app: Any, client: httpx.AsyncClient) -> None:
    ctx = await setup_tenant(app, client)
    r = await client.post(ctx.docs, json={"text": "A short note."}, headers=ctx.headers)
    doc_id = r.json()["documents"][0]["id"]
    viewer = await create_user(app)
    await add_member(app, ctx.tenant, viewer, Role.viewer)
    vh = await bearer(viewer)
    assert (await client.get(ctx.docs, headers=vh)).status_code == 200
    assert (await client.get(f"{ctx.docs}/{doc_id}", headers=vh)).status_code == 200
    r = await client.post(ctx.docs, json={"text": "x"}, headers=vh)
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "documents:write"
    assert (await client.delete(f"{ctx.docs}/{doc_id}", headers=vh)).status_code == 403
    # Another tenant's owner sees nothing, whatever the path says.
    other = await setup_tenant(app, client, "Mine")
    assert (await client.get(f"{ctx.docs}/{doc_id}", headers=other.headers)).status_code == 404
    wrong = f"/v1/tenants/{other.tenant.id}/collections/{ctx.collection_id}/documents/{doc_id}"
    assert (await client.get(wrong, headers=other.headers)).status_code == 404
    wrong_coll = f"{other.docs}/{doc_id}"
    assert (await client.get(wrong_coll, headers=other.headers)).status_code == 404
    assert (await client.get(ctx.docs)).status_code == 401


async def test_the_plan_alone_decides_the_upload_size(app: Any, client: httpx.AsyncClient) -> None:
    """One source of truth: the enterprise plan's 200 MiB (a 51 MiB file here) is not cut to a
    server-wide 50 MiB, and no override can make uploads unlimited or larger than any plan."""
    from tests.support.quota import set_plan, superuser_headers

    ctx = await setup_tenant(app, client)
    admin = await superuser_headers(app)
    await set_plan(client, admin, ctx.tenant.id, "enterprise")
    line = b"All work and no play makes a dull document. "
    big = line * (51 * 1024 * 1024 // len(line))
    assert len(big) > 50 * 1024 * 1024
    r = await upload_files(client, ctx, [("big.txt", big, None)])
    assert r.status_code == 202, r.text[:500]
    del big
    for value in (None, 200 * 1024 * 1024 + 1):
        r = await client.put(
            f"/v1/admin/tenants/{ctx.tenant.id}/plan",
            json={"plan": "enterprise", "overrides": {"max_upload_bytes": value}},
            headers=admin,
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"]["largest"] == 200 * 1024 * 1024, r.text
