"""The ingestion pipeline: extract → chunk → embed → store, for one document or a batch.

Runs inside a Celery task (``atrium.ingestion.process_document``). Each run claims its task's
document with a fresh ``run_id``; when documents wait in the queue (a backlog: queued for
longer than ``ATRIUM_INGESTION_BATCH_WAIT_MS``, never started, small), it also claims up to
``ATRIUM_INGESTION_BATCH_DOCUMENTS`` - 1 of them, of any tenant, in the same transaction. Every
document is then read, chunked, held against its plan, stored (its own PostgreSQL transaction)
and finished on its own; only the model sees them together, in shared length-sorted batches,
which saves the per-document fixed cost (claim, connections, a half-empty model batch) that
kept the pipeline below the model's throughput. One document's failure is its own: it fails
(or, after a transient fault, goes back to the queue with a job of its own) and the others go
on. All writes are fenced on the run id (see ``repository``), and chunk writes replace, so a
task delivered twice, a run interrupted by a crash and then re-run, or a re-index racing a
running job all end with exactly one set of chunks and a consistent row.

Adopted documents keep their own messages: delivered while the run holds the document, such a
message finds it held by a live run of another job and does nothing. If the worker dies, the
run's own message comes back (late acks) and, whatever became of its own document, puts the
documents its dead run held back in the queue with a job each; a document that was started
once runs alone from then on, so one that kills its worker cannot take a batch down with it
twice. The sweeper stays the last resort.

A batch gives documents back to the queue (``requeued``, with a job each) rather than holding
them past what it can afford: adopted documents it has no time left to read (the run's budget),
an adopted document whose text turns out large (it runs alone), and every unfinished document
when the worker's soft time limit fires.

A solo document's row is updated at stage boundaries, at most about once a second (a small
document goes from ``processing`` to ``ready`` without intermediate writes; a large one shows
its stage and percent). A batch's rows show the claim and the end, and a heartbeat of the
whole run every few seconds keeps the stuck-job sweeper and other claims away.
"""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from typing import Any

import structlog

from atrium.billing.quota import Quota
from atrium.ingestion.batch import OUT_OF_TIME, Batch, log_retry
from atrium.ingestion.faults import TransientFailure, is_transient, public_reason
from atrium.ingestion.job_repository import adopt_queued, release_job
from atrium.ingestion.repository import (
    Claimed,
    DocumentRepository,
    job_key,
    job_of,
    new_run_id,
)
from atrium.ingestion.service import PROCESS_TASK
from atrium.ingestion.stages import DocumentRun, Outcome
from atrium.ingestion.tools import Tools
from atrium.kit.db import unit_of_work
from atrium.kit.enqueue import enqueue
from atrium.kit.runtime import Resources
from atrium.models.base import utcnow

__all__ = [
    "MAX_RETRIES",
    "Outcome",
    "TransientFailure",
    "backoff",
    "give_up",
    "note_retry",
    "out_of_time",
    "process",
    "retry_note",
]

log = structlog.get_logger("atrium.ingestion")

#: Retries of a document after transient faults, and the longest wait between two.
MAX_RETRIES = 5
MAX_BACKOFF_SECONDS = 300


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: exponential, with jitter, capped."""
    base = min(MAX_BACKOFF_SECONDS, 5 * 2**retries)
    return float(base * (0.5 + random.random() / 2))  # noqa: S311  # nosec B311


def retry_note(reason: str, retries: int, delay: float) -> str:
    """The row's note while a document waits for retry number ``retries + 1``."""
    return (
        f"Retrying in {delay:.0f} s after a temporary problem ({reason}); "
        f"attempt {retries + 2} of {MAX_RETRIES + 1}"
    )


async def process(
    res: Resources,
    tools: Tools,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    *,
    max_attempts: int,
    retried: int = 0,
    job: str | None = None,
) -> list[Outcome]:
    """Process a task's document end to end, and the backlog documents it adopts.

    Args:
        res: the process's resources.
        tools: extraction, chunking and embedding tools.
        tenant_id: the task's document's tenant.
        document_id: the task's document.
        max_attempts: runs that may stop without finishing (a worker killed: out of memory
            or time) before the document fails instead of being started again.
        retried: runs of the document that ended in a retry after a transient fault (this
            job's and, for a document a batch requeued, the earlier job's); they are among
            its ``attempts`` but finished, so they do not count toward ``max_attempts``.
        job: the job (``repository.job_key`` of the Celery task id); a fresh one without.

    Returns:
        One outcome per document, the task's own first (``ready``, ``failed``, ``skipped``,
        ``superseded`` or ``requeued``). Documents ``requeued`` or, adopted ones, met by a
        transient fault (``retry``) are already back in the queue, with a job of their own.

    Raises:
        TransientFailure: the task's own document met a fault worth retrying later (the
            other documents are finished first: their outcomes are the exception's
            ``outcomes``); the document is left to the retry.
    """
    job = job or job_key(None)
    run_id = new_run_id(job)
    started = time.perf_counter()
    try:
        claims, early = await _claim(
            res, tenant_id, document_id, job, run_id, max_attempts, retried
        )
    except Exception as exc:
        if is_transient(exc):
            log_retry(tenant_id, document_id, exc)
            raise TransientFailure(public_reason(exc), run_id) from exc
        raise
    if early is not None:
        return [early]
    # Settings of the batch: adopted documents larger in text than in upload leave it.
    text_limit = res.settings.ingestion_batch_max_kb * 1024
    quota = Quota.for_resources(res)
    runs = [
        DocumentRun(
            res,
            tools,
            claimed,
            run_id,
            # A batch per document: its settlements are written with its own row.
            quota.with_own_batch(),
            solo=len(claims) == 1,
            text_limit=text_limit if index else None,
        )
        for index, claimed in enumerate(claims)
    ]
    for run in runs:
        # Shown with the document's timings: its embed_ms is its share of a shared model call.
        run.timings["batch_documents"] = len(runs)
    batch = Batch(res, tools, runs)
    try:
        await batch.run(started, float(res.settings.ingestion_batch_budget_seconds))
    finally:
        await batch.close()
    outcomes = [batch.outcomes[id(run)] for run in runs]
    for index, (run, outcome) in enumerate(zip(runs, outcomes, strict=True)):
        if outcome.status == "requeued":
            # The task's own document keeps its retries so far; an adopted one had none.
            own_retries = 0 if index else retried
            await _requeue(res, run, outcome.error or "Requeued", retried=own_retries)
        elif outcome.status == "retry" and index:
            delay = backoff(0)
            note = retry_note(outcome.error or "a connection failed", 0, delay)
            await _requeue(res, run, note, retried=1, countdown=delay)
    if outcomes[0].status == "retry":
        raise TransientFailure(outcomes[0].error or "a connection failed", run_id, outcomes[1:])
    return outcomes


async def _claim(
    res: Resources,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    job: str,
    run_id: str,
    max_attempts: int,
    retried: int,
) -> tuple[list[Claimed], Outcome | None]:
    """Claim the task's document and, in a backlog, adopt more; one transaction."""
    settings = res.settings
    now = utcnow()
    async with unit_of_work(res.sessionmaker) as session:
        # A job delivered again means its worker died: the documents its dead run adopted go
        # back to the queue, each with a job of its own, whatever became of its own document
        # (failed early, deleted: its claim below then finds nothing to do).
        note = "Requeued: the worker stopped while processing it"
        for tenant, document in await release_job(session, job, document_id, note):
            enqueue(session, PROCESS_TASK, tenant_id=str(tenant), document_id=str(document))
        repo = DocumentRepository(session, tenant_id)
        live_after = now - dt.timedelta(seconds=settings.ingestion_stuck_after_seconds)
        claimed = await repo.claim(document_id, run_id, live_after=live_after)
        if claimed is None:
            return [], Outcome("skipped", document_id=str(document_id))
        # Runs that ended in a recorded retry (``retried``: an outage) did finish: only
        # the others count, the runs a dying worker never ended.
        if claimed.attempts - retried > max_attempts:
            reason = (
                f"Processing was started {claimed.attempts - 1 - retried} times without "
                "finishing "
                "(the worker stopped each time, e.g. out of memory or time); the document "
                "may be too large. Split it into smaller files, or re-index it to try again."
            )
            await repo.fail(document_id, run_id, reason, {})
            return [], Outcome("failed", error=reason, document_id=str(document_id))
        claims = [claimed]
        size = settings.ingestion_batch_documents
        max_bytes = settings.ingestion_batch_max_kb * 1024
        if size > 1 and claimed.attempts == 1 and claimed.size_bytes <= max_bytes:
            wait = dt.timedelta(milliseconds=settings.ingestion_batch_wait_ms)
            claims += await adopt_queued(
                session, run_id, limit=size - 1, queued_before=now - wait, max_bytes=max_bytes
            )
    return claims, None


async def _requeue(
    res: Resources,
    run: DocumentRun,
    note: str,
    *,
    retried: int,
    countdown: float | None = None,
) -> None:
    """Put a document of the run back in the queue with a job of its own.

    ``retried`` goes to the new job: the runs of the document that ended in a retry so far
    (they count toward its retries, not toward its ``max_attempts``). A document the run never
    read gives its attempt back.
    """
    try:
        async with unit_of_work(res.sessionmaker) as session:
            mine = await DocumentRepository(session, run.tenant_id).requeue(
                run.document_id, run.run_id, note, unstarted=not run.started
            )
            if mine:
                args: dict[str, Any] = {
                    "tenant_id": str(run.tenant_id),
                    "document_id": str(run.document_id),
                }
                if retried:
                    args["retried"] = retried
                enqueue(session, PROCESS_TASK, countdown=countdown, **args)
    except Exception as exc:
        # The sweeper finds it (still ``processing``, no heartbeat) and requeues it.
        log.warning("ingestion_requeue_failed", document_id=str(run.document_id), error=str(exc))


async def note_retry(
    res: Resources,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    run_id: str | None,
    note: str,
) -> None:
    """Put the document back in ``queued`` with a note saying why and that a retry is coming."""
    async with unit_of_work(res.sessionmaker) as session:
        await DocumentRepository(session, tenant_id).requeue(document_id, run_id, note)


async def give_up(
    res: Resources, tenant_id: uuid.UUID, document_id: uuid.UUID, reason: str
) -> None:
    """Fail the document after the last retry."""
    async with unit_of_work(res.sessionmaker) as session:
        await DocumentRepository(session, tenant_id).fail(document_id, None, reason, {})


async def out_of_time(
    res: Resources, tenant_id: uuid.UUID, document_id: uuid.UUID, job: str
) -> None:
    """After the soft time limit stopped a task outside its documents' steps (waiting on a
    database): its own document fails for time, the others its run held are requeued."""
    reason = (
        "Processing needed more time than the worker allows per document; split it into "
        "smaller files and upload those"
    )
    async with unit_of_work(res.sessionmaker) as session:
        for tenant, other in await release_job(session, job, document_id, OUT_OF_TIME):
            enqueue(session, PROCESS_TASK, tenant_id=str(tenant), document_id=str(other))
        repo = DocumentRepository(session, tenant_id)
        document = await repo.get(document_id)
        if document is not None and job_of(document.run_id) == job:
            await repo.fail(document_id, document.run_id, reason, {})
