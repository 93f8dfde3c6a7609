"""Celery tasks of ingestion: process a document, delete a document, sweep stuck work.

Recovery from a crash, in production:

* a worker *process* that dies mid-task (OOM, segfault): Celery's main process notices and,
  with ``task_reject_on_worker_lost``, requeues the message at once;
* a whole worker (machine) that dies: its unacknowledged message goes back to the queue after
  ``ATRIUM_CELERY_VISIBILITY_TIMEOUT`` (Redis' redelivery; 2 h by default, above the longest
  task);
* and whatever is lost on the way (a message never sent because the broker was down right
  after the upload committed, a redelivery that never comes): the sweeper (beat, every
  ``ATRIUM_INGESTION_SWEEP_INTERVAL_SECONDS``) requeues documents queued or processing without a
  heartbeat for ``ATRIUM_INGESTION_STUCK_AFTER_SECONDS``, and fails those that have already been
  started ``ATRIUM_INGESTION_MAX_ATTEMPTS`` times.

Every path may run a document twice; runs are fenced and chunk writes replace, so the end state
is the same (see ``pipeline``).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from typing import Any

import structlog
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init

from atrium.collections.service import DELETE_TASK as DELETE_COLLECTION
from atrium.embedding.factory import PROCESSES_ENV
from atrium.ingestion import pipeline
from atrium.ingestion.faults import is_transient
from atrium.ingestion.job_repository import stuck_collections, stuck_documents
from atrium.ingestion.pipeline import MAX_RETRIES, backoff
from atrium.ingestion.repository import (
    DocumentRepository,
    job_key,
)
from atrium.ingestion.service import DELETE_TASK, PROCESS_TASK
from atrium.ingestion.tools import worker_tools
from atrium.ingestion.vectorstore import delete_document_chunks
from atrium.kit import metrics, runtime
from atrium.kit.blobstore import get_blobstore
from atrium.kit.cache_versions import bump_collection_version
from atrium.kit.db import unit_of_work
from atrium.kit.enqueue import enqueue
from atrium.models.base import utcnow
from atrium.models.ingestion import DocumentStatus
from atrium.worker import celery_app

log = structlog.get_logger("atrium.ingestion")


@worker_init.connect
def _export_process_count(sender: Any = None, **_: Any) -> None:
    # Runs in the worker's main process before the pool forks: children size their ONNX thread
    # pools from it (see ``atrium.embedding.factory.onnx_threads``).
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        os.environ[PROCESSES_ENV] = str(concurrency)


@celery_app.task(name=PROCESS_TASK, bind=True, max_retries=MAX_RETRIES, ignore_result=True)
def process_document(
    self: Task, *, tenant_id: str, document_id: str, retried: int = 0
) -> dict[str, Any]:
    """Extract, chunk, embed and store a document, and, when a backlog waits, queued
    documents it takes along (see ``ingestion.pipeline``).

    Transient faults (databases, broker, embedding provider) retry with backoff; a bad document
    fails at once with a reason a person can act on. The result lists every document's outcome
    (``kit.metrics`` counts each). ``retried``: retries the document had before this job (a
    batch that took it along met a transient fault and gave it a job of its own).
    """
    tenant, document = uuid.UUID(tenant_id), uuid.UUID(document_id)
    job = job_key(self.request.id)
    retries = int(self.request.retries or 0) + retried

    async def _run() -> list[pipeline.Outcome]:
        res = await runtime.resources()
        tools = worker_tools(res.settings)
        return await pipeline.process(
            res,
            tools,
            tenant,
            document,
            max_attempts=res.settings.ingestion_max_attempts,
            retried=retries,
            job=job,
        )

    try:
        outcomes = runtime.run(_run())
    except SoftTimeLimitExceeded:
        # Raised outside the documents' steps (the run was waiting on a database): the run
        # was cancelled; its documents must not wait for the sweeper.
        _best_effort(pipeline.out_of_time, tenant, document, job)
        raise
    except pipeline.TransientFailure as exc:
        if retries >= MAX_RETRIES:
            reason = (
                f"A temporary problem persisted after {retries + 1} attempts ({exc}); "
                "re-index the document later to try again"
            )
            _best_effort(pipeline.give_up, tenant, document, reason)
            own = pipeline.Outcome("failed", error=reason, document_id=document_id)
            return _report(tenant_id, document_id, [own, *exc.outcomes])
        delay = backoff(retries)
        note = pipeline.retry_note(str(exc), retries, delay)
        _best_effort(pipeline.note_retry, tenant, document, exc.run_id, note)
        # A retried task's result is not counted (``kit.metrics`` counts successes): the
        # other documents of its run are counted here, once.
        metrics.record_ingestion_outcome(_report(tenant_id, document_id, exc.outcomes))
        raise self.retry(countdown=delay, exc=exc) from None
    return _report(tenant_id, document_id, outcomes)


def _report(tenant_id: str, document_id: str, outcomes: list[pipeline.Outcome]) -> dict[str, Any]:
    """Log every document's outcome; the task result's ``documents`` (they feed the worker's
    metrics: kit.metrics.record_ingestion_outcome)."""
    for outcome in outcomes:
        log.info(
            "ingestion_done",
            tenant_id=outcome.tenant_id or tenant_id,
            document_id=outcome.document_id or document_id,
            status=outcome.status,
            chunks=outcome.chunks,
            tokens=outcome.tokens,
            batch=len(outcomes),
            **outcome.timings,
        )
    return {"documents": [outcome.as_result() for outcome in outcomes]}


def _best_effort(fn: Any, *args: Any) -> None:
    # The database may be what is failing: recording the state must not hide the retry.
    async def _call() -> None:
        res = await runtime.resources()
        await fn(res, *args)

    try:
        runtime.run(_call())
    except Exception as exc:
        log.warning("ingestion_state_write_failed", error=f"{type(exc).__name__}: {exc}")


@celery_app.task(
    name=DELETE_TASK,
    bind=True,
    max_retries=10,
)
def delete_document(self: Task, *, tenant_id: str, document_id: str) -> dict[str, Any]:
    """Remove a document marked ``deleting``: its chunks, its file, then its row."""
    tenant, document_id_ = uuid.UUID(tenant_id), uuid.UUID(document_id)

    async def _run() -> dict[str, Any]:
        res = await runtime.resources()
        async with res.sessionmaker() as session:
            document = await DocumentRepository(session, tenant).get(document_id_)
            if document is None or document.status is not DocumentStatus.deleting:
                return {"deleted": False}
            collection_id, blob_key = document.collection_id, document.blob_key
        async with res.vector_pool.connection() as conn:
            chunks = await delete_document_chunks(conn, tenant, document_id_)
        await get_blobstore(res.settings).delete(blob_key)
        # The version moves before the row goes: while the row is there, searches leave the
        # document out by id (part of their cache key); once it is gone they no longer do, and
        # only a new version keeps them from finding a result cached before the deletion.
        await bump_collection_version(res.redis, tenant, collection_id)
        async with unit_of_work(res.sessionmaker) as session:
            document = await DocumentRepository(session, tenant).get(document_id_)
            if document is not None and document.status is DocumentStatus.deleting:
                await session.delete(document)
        return {"deleted": True, "chunks": chunks}

    try:
        return runtime.run(_run())
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(countdown=backoff(int(self.request.retries or 0)), exc=exc) from exc
        raise


@celery_app.task(name="atrium.ingestion.sweep")
def sweep() -> dict[str, int]:
    """Requeue (or fail) documents stuck in ``queued``/``processing``, and restart deletions
    that stopped. Runs from beat; touches every tenant, so it only enqueues tenant tasks."""

    async def _run() -> dict[str, int]:
        res = await runtime.resources()
        settings = res.settings
        now = utcnow()
        older_than = now - dt.timedelta(seconds=settings.ingestion_stuck_after_seconds)
        counts = {"requeued": 0, "failed": 0, "deletions": 0}
        async with unit_of_work(res.sessionmaker) as session:
            for document in await stuck_documents(session, older_than):
                tenant_id, document_id = str(document.tenant_id), str(document.id)
                document.heartbeat_at = now
                if document.status is DocumentStatus.deleting:
                    enqueue(session, DELETE_TASK, tenant_id=tenant_id, document_id=document_id)
                    counts["deletions"] += 1
                elif document.attempts >= settings.ingestion_max_attempts:
                    document.status = DocumentStatus.failed
                    document.stage = None
                    document.run_id = None
                    document.error = (
                        f"Processing was started {document.attempts} times without finishing "
                        "(the worker stopped each time); the document may be too large. Split "
                        "it into smaller files, or re-index it to try again."
                    )
                    counts["failed"] += 1
                else:
                    was = document.status.value
                    document.status = DocumentStatus.queued
                    document.stage = None
                    document.run_id = None
                    document.error = f"Requeued: it was {was} with no progress for a while"
                    enqueue(session, PROCESS_TASK, tenant_id=tenant_id, document_id=document_id)
                    counts["requeued"] += 1
            for collection in await stuck_collections(session, older_than):
                collection.updated_at = now
                enqueue(
                    session,
                    DELETE_COLLECTION,
                    tenant_id=str(collection.tenant_id),
                    collection_id=str(collection.id),
                )
                counts["deletions"] += 1
        if any(counts.values()):
            log.warning("ingestion_sweep", **counts)
        return counts

    return runtime.run(_run())
