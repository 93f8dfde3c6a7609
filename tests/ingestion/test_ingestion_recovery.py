"""Crashes and stuck jobs: a worker killed in the middle of a document, a task delivered twice,
and the sweeper for documents left behind. The end state is always exactly one set of chunks."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from atrium.embedding.hosted import LiteLLMEmbedder
from atrium.ingestion.chunking import Chunker
from atrium.ingestion.stages import LARGE_TEXT_CHARS
from atrium.kit.vectordb import partition_name
from atrium.models import Document
from atrium.models.base import utcnow
from tests.support.documents import chunk_rows, prose, setup_tenant, wait_document
from tests.support.llm_server import EMBEDDING_ENV, LLMServer
from tests.support.services import WorkerProcess

#: Redis redelivers an unacknowledged task after this many seconds (production: 2 hours).
VISIBILITY_TIMEOUT = 4


def expected_chunks(settings: Any, text: str) -> list[str]:
    """What the crash worker's chunker makes of ``text`` (the hosted embedder's, by characters,
    with the same settings)."""
    embedder = LiteLLMEmbedder(
        EMBEDDING_ENV["ATRIUM_EMBEDDING_MODEL"],
        settings.embedding_dimension,
        max_tokens=int(EMBEDDING_ENV["ATRIUM_EMBEDDING_MAX_TOKENS"]),
    )
    chunker = Chunker.for_embedder(embedder, settings.chunk_tokens, settings.chunk_overlap_tokens)
    return [chunk.text for chunk in chunker.split(text)]


@pytest.fixture
def crash_worker(
    celery_worker: WorkerProcess, test_env: dict[str, Any], llm_server: LLMServer
) -> Iterator[WorkerProcess]:
    """A worker of our own, with a short visibility timeout, while the shared one is stopped
    (otherwise the shared one would simply take the task over)."""
    celery_worker.stop()
    env = {
        **os.environ,
        **EMBEDDING_ENV,
        "ATRIUM_EMBEDDING_API_BASE": llm_server.base_url,
        "ATRIUM_CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    }
    worker = WorkerProcess(env, test_env["data_dir"] / "crash-worker.log")
    llm_server.behaviour.clear()
    worker.start()
    try:
        yield worker
    finally:
        llm_server.behaviour.clear()
        worker.kill()
        celery_worker.start()


async def test_worker_killed_mid_document_finishes_with_exact_chunks(
    app: Any,
    client: httpx.AsyncClient,
    crash_worker: WorkerProcess,
    llm_server: LLMServer,
    settings: Any,
) -> None:
    ctx = await setup_tenant(app, client)
    text = prose(12000)
    assert len(text) > LARGE_TEXT_CHARS  # its stages are written as they start
    expected = expected_chunks(settings, text)
    assert len(expected) > 1

    # Kill the whole worker (main process and pool) while it embeds the document: the provider
    # holds the first embedding request until then.
    release = threading.Event()
    llm_server.requests.clear()
    llm_server.behaviour["hold"] = release
    try:
        r = await client.post(ctx.docs, json={"title": "Big", "text": text}, headers=ctx.headers)
        doc = r.json()["documents"][0]
        deadline = asyncio.get_running_loop().time() + 120
        while not any(q["path"].endswith("/embeddings") for q in llm_server.requests):
            assert asyncio.get_running_loop().time() < deadline, "no embedding request came"
            await asyncio.sleep(0.05)
        crash_worker.kill()
    finally:
        del llm_server.behaviour["hold"]
        release.set()
    assert await chunk_rows(settings, doc["id"]) == []
    stuck = (await client.get(f"{ctx.docs}/{doc['id']}", headers=ctx.headers)).json()
    assert stuck["status"] == "processing" and stuck["attempts"] == 1
    assert stuck["stage"] == "embed"

    # A new worker gets the unacknowledged task back once the visibility timeout has passed.
    crash_worker.start()
    final = await wait_document(client, ctx, doc["id"], timeout=180)
    assert final["status"] == "ready", final
    assert final["attempts"] == 2
    rows = await chunk_rows(settings, doc["id"])
    assert [text for _, _, text in rows] == expected
    assert [ordinal for _, ordinal, _ in rows] == list(range(len(expected)))
    assert {part for part, _, _ in rows} == {partition_name(ctx.tenant.id)}
    assert final["chunk_count"] == len(expected)

    # The same task delivered twice more (a duplicate message) changes nothing.
    from atrium.worker import celery_app

    r = await client.post(f"{ctx.docs}/{doc['id']}/reindex", headers=ctx.headers)
    assert r.status_code == 202
    celery_app.send_task(
        "atrium.ingestion.process_document",
        kwargs={"tenant_id": str(ctx.tenant.id), "document_id": doc["id"]},
    )
    # One worker process takes tasks in order: once this ping is answered, both ran.
    ping = celery_app.send_task("atrium.ping", kwargs={"payload": "after"})
    assert await asyncio.to_thread(ping.get, timeout=180) is not None
    final = await wait_document(client, ctx, doc["id"], timeout=180)
    assert final["status"] == "ready"
    rows = await chunk_rows(settings, doc["id"])
    assert [text for _, _, text in rows] == expected


async def _sweep() -> dict[str, int]:
    from atrium.worker import celery_app

    result = celery_app.send_task("atrium.ingestion.sweep")
    value: dict[str, int] = await asyncio.to_thread(result.get, timeout=60)
    return value


async def test_sweeper_requeues_stuck_documents_and_fails_hopeless_ones(
    app: Any, client: httpx.AsyncClient, celery_worker: WorkerProcess, settings: Any
) -> None:
    ctx = await setup_tenant(app, client)
    r = await client.post(ctx.docs, json={"text": prose(600)}, headers=ctx.headers)
    a = r.json()["documents"][0]
    r = await client.post(ctx.docs, json={"text": prose(700)}, headers=ctx.headers)
    b = r.json()["documents"][0]
    ready_a = await wait_document(client, ctx, a["id"])
    await wait_document(client, ctx, b["id"])
    rows_a = await chunk_rows(settings, a["id"])

    # Make both look abandoned mid-run an hour ago (as after a lost worker); B has used up
    # its attempts.
    long_ago = utcnow().replace(microsecond=0) - dt.timedelta(hours=1)
    async with app.state.sessionmaker() as session:
        for doc_id, attempts in ((a["id"], 1), (b["id"], settings.ingestion_max_attempts)):
            await session.execute(
                update(Document)
                .where(Document.id == uuid.UUID(doc_id))
                .values(
                    status="processing",
                    stage="embed",
                    run_id=str(uuid.uuid4()),
                    heartbeat_at=long_ago,
                    attempts=attempts,
                )
            )
        await session.commit()

    counts = await _sweep()
    assert counts["requeued"] >= 1 and counts["failed"] >= 1
    final_a = await wait_document(client, ctx, a["id"])
    assert final_a["status"] == "ready" and final_a["chunk_count"] == ready_a["chunk_count"]
    assert [(o, t) for _, o, t in await chunk_rows(settings, a["id"])] == [
        (o, t) for _, o, t in rows_a
    ]
    final_b = (await client.get(f"{ctx.docs}/{b['id']}", headers=ctx.headers)).json()
    assert final_b["status"] == "failed"
    assert "without finishing" in final_b["error"] and "re-index" in final_b["error"]
    # Nothing stuck any more: a second sweep finds nothing of ours.
    await _sweep()
    assert (await client.get(f"{ctx.docs}/{a['id']}", headers=ctx.headers)).json()[
        "status"
    ] == "ready"
