"""Several documents per task: a backlog is processed in batches (one model call for all their
chunks), each document keeps its own chunks, status and failure, and a worker killed mid-batch
loses nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest

from atrium.kit.blobstore import get_blobstore
from atrium.kit.vectordb import partition_name
from atrium.models import Document
from tests.support.documents import chunk_rows, prose, setup_tenant, upload_files, wait_document
from tests.support.files import make_docx
from tests.support.llm_server import EMBEDDING_ENV, LLMServer
from tests.support.services import WorkerProcess


@pytest.fixture(scope="module")
def no_worker(celery_worker: WorkerProcess) -> Iterator[WorkerProcess]:
    """The session's worker stopped while this module runs (jobs pile up in the queue; one
    restart for all its tests), then started again (it then finds the tests' leftover jobs
    done, or runs them)."""
    celery_worker.stop()
    try:
        yield celery_worker
    finally:
        celery_worker.start()


class Killed(BaseException):
    """Stands for the worker process dying mid-step (nothing after it runs but ``finally``)."""


class FaultyChunker:
    """The real chunker; its calls numbered in ``fail`` (from 1: the documents in the order
    the run reads them) raise ``error`` instead."""

    def __init__(self, inner: Any, error: Callable[[], BaseException], fail: set[int]) -> None:
        self.inner = inner
        self.error = error
        self.fail = fail
        self.calls = 0

    def split(self, text: str, markdown: bool = False) -> Any:
        self.calls += 1
        if self.calls in self.fail:
            raise self.error()
        return self.inner.split(text, markdown=markdown)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class FaultyEmbedder:
    """The real embedder; its first ``fail`` calls raise ``error`` instead."""

    def __init__(self, inner: Any, error: BaseException, fail: int = 1) -> None:
        self.inner = inner
        self.error = error
        self.fail = fail
        self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.calls <= self.fail:
            raise self.error

    def embed(self, texts: list[str]) -> Any:
        self._call()
        return self.inner.embed(texts)

    def embed_token_ids(self, ids: list[list[int]]) -> Any:
        self._call()
        return self.inner.embed_token_ids(ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def real_tools(settings: Any) -> Any:
    from atrium.ingestion.tools import worker_tools

    return worker_tools(settings)


def resources(app: Any, settings: Any, **overrides: Any) -> Any:
    """The test app's connections, with settings that batch at once (no backlog wait)."""
    from atrium.kit.runtime import Resources

    return Resources(
        settings=settings.model_copy(update={"ingestion_batch_wait_ms": 0, **overrides}),
        engine=app.state.engine,
        sessionmaker=app.state.sessionmaker,
        vector_pool=app.state.vector_pool,
        redis=app.state.redis,
    )


async def rows_of(app: Any, ids: list[str]) -> list[Document]:
    async with app.state.sessionmaker() as session:
        found = [await session.get(Document, uuid.UUID(i)) for i in ids]
    assert all(d is not None for d in found)
    return [d for d in found if d is not None]


async def jobs_of(settings: Any, document_id: str) -> list[dict[str, Any]]:
    """The kwargs of the process jobs waiting in the broker for one document."""
    import redis.asyncio as aioredis

    from atrium.ingestion.service import PROCESS_TASK
    from atrium.worker import celery_app

    broker = aioredis.from_url(settings.celery_broker_url)
    try:
        raw = await broker.lrange(celery_app.conf.task_default_queue, 0, -1)
    finally:
        await broker.aclose()
    found = []
    for item in raw:
        message = json.loads(item)
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if message["headers"]["task"] == PROCESS_TASK and kwargs["document_id"] == document_id:
            found.append(kwargs)
    return found


async def _upload(client: httpx.AsyncClient, ctx: Any, texts: list[str]) -> list[str]:
    ids = []
    for number, text in enumerate(texts):
        r = await client.post(
            ctx.docs, json={"title": f"Doc {number}", "text": text}, headers=ctx.headers
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["documents"][0]["id"])
    return ids


async def test_a_backlog_is_processed_together_and_a_bad_document_fails_alone(
    app: Any, client: httpx.AsyncClient, no_worker: WorkerProcess, settings: Any, real_tools: Any
) -> None:
    from atrium.ingestion import pipeline

    ctx = await setup_tenant(app, client)
    other = await setup_tenant(app, client, "Other")
    texts = [prose(120 + 90 * n) for n in range(4)]
    ids = await _upload(client, ctx, texts)
    # A document of another tenant is taken along too; one whose file is gone fails alone.
    other_ids = await _upload(client, other, [prose(300), prose(200)])
    async with app.state.sessionmaker() as session:
        missing = await session.get(Document, uuid.UUID(other_ids[1]))
        assert missing is not None
        await get_blobstore(settings).delete(missing.blob_key)

    res = resources(app, settings)
    tools = real_tools
    outcomes = await pipeline.process(
        res, tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5, job="0" * 17
    )
    # The task's own document first, then the adopted ones (oldest first).
    assert outcomes[0].document_id == ids[0]
    status = {o.document_id: o.status for o in outcomes}
    assert status == {**dict.fromkeys([*ids, other_ids[0]], "ready"), other_ids[1]: "failed"}

    chunker = tools.chunker
    for doc_id, text in zip(ids, texts, strict=True):
        final = await wait_document(client, ctx, doc_id, timeout=5)
        assert final["status"] == "ready" and final["attempts"] == 1
        assert final["timings"]["batch_documents"] == 6
        expected = [chunk.text for chunk in chunker.split(text)]
        rows = await chunk_rows(settings, doc_id)
        assert [t for _, _, t in rows] == expected
        assert [o for _, o, _ in rows] == list(range(len(expected)))
        assert {part for part, _, _ in rows} == {partition_name(ctx.tenant.id)}
        assert final["chunk_count"] == len(expected)
    good = await wait_document(client, other, other_ids[0], timeout=5)
    assert good["status"] == "ready"
    assert {part for part, _, _ in await chunk_rows(settings, other_ids[0])} == {
        partition_name(other.tenant.id)
    }
    bad = await wait_document(client, other, other_ids[1], timeout=5)
    assert bad["status"] == "failed" and "missing from storage" in bad["error"]
    assert await chunk_rows(settings, other_ids[1]) == []

    # The adopted documents' own jobs, delivered now, find them done: nothing changes.
    again = await pipeline.process(
        res, tools, ctx.tenant.id, uuid.UUID(ids[1]), max_attempts=5, job="1" * 17
    )
    assert [o.status for o in again] == ["skipped"]


async def test_a_batch_out_of_budget_requeues_the_documents_it_did_not_read(
    app: Any, client: httpx.AsyncClient, no_worker: WorkerProcess, settings: Any, real_tools: Any
) -> None:
    from atrium.ingestion import pipeline

    ctx = await setup_tenant(app, client)
    ids = await _upload(
        client,
        ctx,
        [
            f"{uuid.uuid4()} {prose(80)}",
            f"{uuid.uuid4()} {prose(90)}",
            f"{uuid.uuid4()} {prose(100)}",
        ],
    )
    # No time budget: the run reads its own document only; the ones it adopted go back.
    res = resources(app, settings, ingestion_batch_budget_seconds=0)
    outcomes = await pipeline.process(
        res, real_tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5, job="2" * 17
    )
    assert [o.status for o in outcomes] == ["ready", "requeued", "requeued"]
    own, *others = await rows_of(app, ids)
    assert own.status.value == "ready"
    for row in others:
        # Never read: the claim is not an attempt, and a job of its own waits.
        assert (row.status.value, row.attempts, row.run_id) == ("queued", 0, None)
        assert row.error is not None and "ran out of time" in row.error
        assert await jobs_of(settings, str(row.id))


@pytest.mark.parametrize("stage", ["read", "embed"])
async def test_the_soft_time_limit_in_a_batch_requeues_its_unfinished_documents(
    app: Any,
    client: httpx.AsyncClient,
    no_worker: WorkerProcess,
    settings: Any,
    real_tools: Any,
    stage: str,
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from atrium.ingestion import pipeline
    from atrium.ingestion.tools import Tools

    ctx = await setup_tenant(app, client)
    other = await setup_tenant(app, client, "Other")
    ids = await _upload(client, ctx, [f"{uuid.uuid4()} {prose(70)}", f"{uuid.uuid4()} {prose(80)}"])
    ids += await _upload(client, other, [f"{uuid.uuid4()} {prose(90)}"])
    embedder = FaultyEmbedder(real_tools.embedder, SoftTimeLimitExceeded(), 0)
    chunker = real_tools.chunker
    if stage == "read":  # the limit fires while the second document is read
        chunker = FaultyChunker(real_tools.chunker, SoftTimeLimitExceeded, {2})
    else:  # while the model embeds all three documents' chunks together
        embedder.fail = 1
    tools = Tools(embedder=embedder, chunker=chunker)  # type: ignore[arg-type]
    outcomes = await pipeline.process(
        resources(app, settings), tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5
    )
    # No document failed for the time the batch spent, and nothing was embedded one by one:
    # every unfinished document is back in the queue with a job of its own.
    assert [o.status for o in outcomes] == ["requeued"] * 3
    assert embedder.calls == (1 if stage == "embed" else 0)
    for row in await rows_of(app, ids):
        assert row.status.value == "queued" and row.run_id is None
        assert row.error is not None and "time limit" in row.error
        assert row.attempts == (0 if stage == "read" and row.id == uuid.UUID(ids[2]) else 1)
        assert await jobs_of(settings, str(row.id))
        assert await chunk_rows(settings, str(row.id)) == []


async def test_a_returning_job_requeues_its_dead_runs_documents_whatever_its_own_became(
    app: Any, client: httpx.AsyncClient, no_worker: WorkerProcess, settings: Any, real_tools: Any
) -> None:
    from atrium.ingestion import pipeline
    from atrium.ingestion.tools import Tools

    ctx = await setup_tenant(app, client)
    ids = await _upload(
        client,
        ctx,
        [
            f"{uuid.uuid4()} {prose(60)}",
            f"{uuid.uuid4()} {prose(70)}",
            f"{uuid.uuid4()} {prose(80)}",
        ],
    )
    own = (await rows_of(app, ids[:1]))[0]
    await get_blobstore(settings).delete(own.blob_key)  # the job's own document fails early
    res = resources(app, settings)
    job = "3" * 17
    # The worker dies while the model embeds the two adopted documents.
    dying = Tools(
        embedder=FaultyEmbedder(real_tools.embedder, Killed()),  # type: ignore[arg-type]
        chunker=real_tools.chunker,
    )
    with pytest.raises(Killed):
        await pipeline.process(res, dying, ctx.tenant.id, own.id, max_attempts=5, job=job)
    rows = await rows_of(app, ids)
    assert [r.status.value for r in rows] == ["failed", "processing", "processing"]

    # The job's message comes back: its own document is failed (nothing to do), and the
    # documents its dead run adopted go back to the queue at once, not to the sweeper.
    again = await pipeline.process(res, real_tools, ctx.tenant.id, own.id, max_attempts=5, job=job)
    assert [o.status for o in again] == ["skipped"]
    for row in (await rows_of(app, ids))[1:]:
        assert (row.status.value, row.run_id) == ("queued", None)
        assert await jobs_of(settings, str(row.id))


async def test_an_adopted_document_with_a_large_text_is_requeued_to_run_alone(
    app: Any, client: httpx.AsyncClient, no_worker: WorkerProcess, settings: Any, real_tools: Any
) -> None:
    from atrium.ingestion import pipeline

    ctx = await setup_tenant(app, client)
    ids = await _upload(client, ctx, [f"{uuid.uuid4()} {prose(60)}"])
    docx = make_docx(paragraphs=400)  # small as uploaded, a long text once read
    r = await upload_files(client, ctx, [("long.docx", docx, None)])
    assert r.status_code == 202, r.text
    ids.append(r.json()["documents"][0]["id"])
    max_kb = len(docx) // 1024 + 2
    res = resources(app, settings, ingestion_batch_max_kb=max_kb)
    outcomes = await pipeline.process(
        res, real_tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5
    )
    assert [o.status for o in outcomes] == ["ready", "requeued"]
    row = (await rows_of(app, ids[1:]))[0]
    # Read once (an attempt: it is not taken into a batch again), then back with a job.
    assert (row.status.value, row.attempts, row.run_id) == ("queued", 1, None)
    assert row.error is not None and "run alone" in row.error
    assert await jobs_of(settings, ids[1])
    assert await chunk_rows(settings, ids[1]) == []


async def test_a_retry_of_the_tasks_document_keeps_the_others_outcomes(
    app: Any, client: httpx.AsyncClient, no_worker: WorkerProcess, settings: Any, real_tools: Any
) -> None:
    from atrium.ingestion import pipeline
    from atrium.ingestion.tools import Tools

    ctx = await setup_tenant(app, client)
    ids = await _upload(
        client,
        ctx,
        [
            f"{uuid.uuid4()} {prose(60)}",
            f"{uuid.uuid4()} {prose(70)}",
            f"{uuid.uuid4()} {prose(80)}",
        ],
    )
    # An outage meets the first and the last document.
    reset = FaultyChunker(real_tools.chunker, lambda: ConnectionError("reset"), {1, 3})
    tools = Tools(embedder=real_tools.embedder, chunker=reset)  # type: ignore[arg-type]
    with pytest.raises(pipeline.TransientFailure) as caught:
        await pipeline.process(
            resources(app, settings), tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5
        )
    # The task retries its own document; the others' outcomes still reach the log and
    # the metrics (kit.metrics counts ``ready`` ones).
    assert [(o.document_id, o.status) for o in caught.value.outcomes] == [
        (ids[1], "ready"),
        (ids[2], "retry"),
    ]
    assert caught.value.outcomes[0].chunks >= 1
    # The adopted document met a fault: back in the queue, its job knowing one retry is spent.
    row = (await rows_of(app, ids[2:]))[0]
    assert row.status.value == "queued" and "attempt 2 of 6" in (row.error or "")
    jobs = await jobs_of(settings, ids[2])  # its upload's job too (no worker consumed it)
    assert [job["retried"] for job in jobs if "retried" in job] == [1]


async def test_a_connection_reset_while_storing_one_document_spares_the_next(
    app: Any,
    client: httpx.AsyncClient,
    no_worker: WorkerProcess,
    settings: Any,
    real_tools: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg

    from atrium.ingestion import pipeline, stages, vectorstore

    ctx = await setup_tenant(app, client)
    ids = await _upload(client, ctx, [f"{uuid.uuid4()} {prose(n)}" for n in (60, 70, 80)])
    real = vectorstore.replace_document_chunks
    calls: list[int] = []

    async def reset_once(conn: Any, **kwargs: Any) -> bool:
        calls.append(conn.info.backend_pid)
        if len(calls) == 2:  # the server drops the connection under the second one's store
            async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", (calls[-1],))
        return await real(conn, **kwargs)

    monkeypatch.setattr(stages, "replace_document_chunks", reset_once)
    outcomes = await pipeline.process(
        resources(app, settings), real_tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5
    )
    # That document goes back to the queue (an outage); the next is stored on a fresh
    # connection instead of meeting the dead one.
    assert [o.status for o in outcomes] == ["ready", "retry", "ready"]
    assert calls[2] != calls[1]
    assert len(await chunk_rows(settings, ids[2])) >= 1


async def test_a_document_whose_ready_write_fails_fails_alone(
    app: Any,
    client: httpx.AsyncClient,
    no_worker: WorkerProcess,
    settings: Any,
    real_tools: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from atrium.ingestion import pipeline, stages

    ctx = await setup_tenant(app, client)
    other = await setup_tenant(app, client, "Other")
    ids = await _upload(client, ctx, [f"{uuid.uuid4()} {prose(60)}"])
    ids += await _upload(client, other, [f"{uuid.uuid4()} {prose(70)}"])
    real = stages.DocumentRun.finish

    async def finish(run: Any, session: Any, total_ms: float) -> bool:
        if str(run.document_id) == ids[1]:
            raise ValueError("a bug in one tenant's row")
        return await real(run, session, total_ms)

    monkeypatch.setattr(stages.DocumentRun, "finish", finish)
    outcomes = await pipeline.process(
        resources(app, settings), real_tools, ctx.tenant.id, uuid.UUID(ids[0]), max_attempts=5
    )
    # Each row is made ready in its own transaction: the other tenant's fault is its own.
    assert [o.status for o in outcomes] == ["ready", "failed"]
    assert [r.status.value for r in await rows_of(app, ids)] == ["ready", "failed"]


@pytest.fixture
def batch_crash_worker(
    no_worker: WorkerProcess, test_env: dict[str, Any], llm_server: LLMServer
) -> Iterator[WorkerProcess]:
    """A worker with one pool process that batches at once (no backlog wait) and embeds
    through the loopback provider (which can hold its answer)."""
    env = {
        **os.environ,
        **EMBEDDING_ENV,
        "ATRIUM_EMBEDDING_API_BASE": llm_server.base_url,
        "ATRIUM_INGESTION_BATCH_WAIT_MS": "0",
        "ATRIUM_LOG_LEVEL": "INFO",
        "TEST_WORKER_PRELOAD_LITELLM": "1",
    }
    worker = WorkerProcess(
        env,
        test_env["data_dir"] / "batch-crash-worker.log",
        argv=["--pool=prefork", "--concurrency=1"],
    )
    llm_server.behaviour.clear()
    # The module's other tests left jobs in the queue: their embedding requests must not be
    # the ones this worker is killed during.
    from atrium.worker import celery_app

    celery_app.control.purge()
    worker.start()
    try:
        yield worker
    finally:
        llm_server.behaviour.clear()
        worker.kill()


async def test_worker_killed_mid_batch_loses_nothing(
    app: Any,
    client: httpx.AsyncClient,
    batch_crash_worker: WorkerProcess,
    llm_server: LLMServer,
    settings: Any,
) -> None:
    ctx = await setup_tenant(app, client)
    texts = [prose(150 + 60 * n) for n in range(4)]

    # The provider holds the batch's embedding request; the pool process is killed meanwhile
    # (SIGKILL, as the kernel's out-of-memory killer does). One request uploads the four
    # files: their jobs leave together once it commits, so the first job's claim finds the
    # other three queued and takes them along.
    release = threading.Event()
    llm_server.requests.clear()
    llm_server.behaviour["hold"] = release
    try:
        r = await upload_files(
            client, ctx, [(f"doc-{n}.txt", t.encode(), "text/plain") for n, t in enumerate(texts)]
        )
        assert r.status_code == 202, r.text
        ids = [d["id"] for d in r.json()["documents"]]
        deadline = asyncio.get_running_loop().time() + 120
        while not any(q["path"].endswith("/embeddings") for q in llm_server.requests):
            assert asyncio.get_running_loop().time() < deadline, "no embedding request came"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(_kill_pool_process, batch_crash_worker)
        # Celery gives the batch's own job back at once (a lost worker rejects it); its new
        # run's model call is held too: nothing is stored yet, and nothing stays lost.
        for doc_id in ids:
            assert await chunk_rows(settings, doc_id) == []
            row = (await client.get(f"{ctx.docs}/{doc_id}", headers=ctx.headers)).json()
            assert row["status"] in ("processing", "queued") and row["attempts"] >= 1
    finally:
        del llm_server.behaviour["hold"]
        release.set()

    # The others' jobs find their documents held by a live run and leave them; the returning
    # job puts them back in the queue, each with a job of its own, and they run alone.
    for doc_id, text in zip(ids, texts, strict=True):
        final = await wait_document(client, ctx, doc_id, timeout=120)
        assert final["status"] == "ready", final
        # All four were in the killed batch (one start each), then ran alone.
        assert final["attempts"] == 2 and final["timings"]["batch_documents"] == 1
        rows = await chunk_rows(settings, doc_id)
        assert [o for _, o, _ in rows] == list(range(final["chunk_count"]))  # one set
        assert final["chunk_count"] >= 2
        source = " ".join(text.split())
        assert all(" ".join(t.split()) in source for _, _, t in rows)


def _kill_pool_process(worker: WorkerProcess) -> None:
    """SIGKILL the worker's (only) pool process."""
    assert worker.proc is not None
    (child,) = psutil.Process(worker.proc.pid).children()
    child.kill()
    child.wait(30)
