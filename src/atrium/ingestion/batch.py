"""The documents of one processing run through the stages together (see ``pipeline``).

Each document is read, chunked, held, stored (its own PostgreSQL transaction), made ``ready``
with its quota settlements (its own transaction) and failed on its own; the model gets all
their chunks in shared length-sorted batches.

The worker's time limit covers the whole run: documents a run adopted are read only while the
run is within its budget (``ATRIUM_INGESTION_BATCH_BUDGET_SECONDS``), and when the soft limit
fires in a batch, the documents not finished go back to the queue (``requeued``) rather than
one of them failing for time the others spent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from typing import Any

import numpy as np
import structlog
from celery.exceptions import SoftTimeLimitExceeded

from atrium.billing.quota import QuotaExceeded
from atrium.embedding.base import EmbeddingError
from atrium.ingestion.exceptions import BadDocument, RunAlone, Superseded
from atrium.ingestion.faults import is_transient, public_reason
from atrium.ingestion.job_repository import heartbeat_run
from atrium.ingestion.stages import STAGE_PERCENT, DocumentRun, Outcome, ms
from atrium.ingestion.tools import Tools
from atrium.kit.cache_versions import bump_collection_version
from atrium.kit.db import unit_of_work
from atrium.kit.runtime import Resources

log = structlog.get_logger("atrium.ingestion")

#: Texts per embedder call: large enough to batch well, small enough that a solo document's
#: row shows its embedding progress and a batch's heartbeat keeps its pace.
EMBED_SLICE = 128
#: Seconds between two heartbeats of a batch (its rows show no stages meanwhile).
HEARTBEAT_SECONDS = 10.0

#: Notes of the documents a batch gives back to the queue (``requeued``).
OVER_BUDGET = "Requeued: the batch that took it along ran out of time before reading it"
OUT_OF_TIME = "Requeued: the batch that took it along reached the worker's time limit"
TOO_LARGE = "Requeued to run alone: its text is too large to share a batch"


def length_groups(
    token_counts: list[int], max_size: int = EMBED_SLICE, max_padding: float = 0.2
) -> list[list[int]]:
    """Indices of chunks grouped for embedding calls, longest first.

    A batch is padded to its longest text, so a short chunk (typically a document's last) next
    to full ones wastes most of its row; a chunk more than ``max_padding`` shorter than its
    group's longest starts a new group instead. Groups hold at most ``max_size`` chunks.
    """
    order = sorted(range(len(token_counts)), key=lambda i: -token_counts[i])
    groups: list[list[int]] = []
    for index in order:
        current = groups[-1] if groups else None
        if (
            current is None
            or len(current) >= max_size
            or token_counts[index] < (1 - max_padding) * token_counts[current[0]]
        ):
            groups.append([index])
        else:
            current.append(index)
    return groups


class Batch:
    """The documents of one run, through the stages together."""

    def __init__(self, res: Resources, tools: Tools, runs: list[DocumentRun]):
        self.res = res
        self.tools = tools
        self.runs = runs
        self.run_id = runs[0].run_id
        self.outcomes: dict[int, Outcome] = {}
        self._beat = time.monotonic()

    def alive(self) -> list[DocumentRun]:
        """The documents still going (no outcome yet)."""
        return [run for run in self.runs if id(run) not in self.outcomes]

    async def guard(self, run: DocumentRun, step: Awaitable[Any]) -> None:
        """Run one document's step; a failure ends that document only.

        Raises:
            SoftTimeLimitExceeded: in a batch (the time went to every document, not this one).
        """
        outcome = await _guarded(run, step, alone=len(self.runs) == 1)
        if outcome is not None:
            await self.end(run, outcome)

    async def end(self, run: DocumentRun, outcome: Outcome) -> None:
        """Record how a document ended and give back what it held for work not done."""
        self.outcomes[id(run)] = outcome
        await _quietly(run.release())

    async def heartbeat(self) -> None:
        """Refresh every document's heartbeat, every few seconds, in a batch."""
        if len(self.runs) == 1 or time.monotonic() - self._beat < HEARTBEAT_SECONDS:
            return
        self._beat = time.monotonic()
        try:
            async with unit_of_work(self.res.sessionmaker) as session:
                await heartbeat_run(session, self.run_id)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            # A missed beat costs nothing yet (the sweeper waits minutes); the documents'
            # own writes meet the fault, if it lasts, and handle it one by one.
            log.warning("ingestion_heartbeat_failed", error=f"{type(exc).__name__}: {exc}")

    async def run(self, started: float, budget: float) -> None:
        """Take the documents through the stages; ``budget``: seconds after ``started`` past
        which adopted documents are no longer read (they are ``requeued``)."""
        try:
            for index, run in enumerate(self.runs):
                if index and time.perf_counter() - started > budget:
                    await self.end(run, run.outcome("requeued", OVER_BUDGET))
                    continue
                await self.guard(run, run.prepare())
                await self.heartbeat()
            await self.embed()
            await self.store()
            await self.finish(started)
        except SoftTimeLimitExceeded:
            if len(self.runs) == 1:
                raise
            # A minute and a half is left before the hard limit kills the process: the
            # documents not finished go back to the queue now, not to the sweeper later.
            log.warning("ingestion_batch_out_of_time", documents=len(self.alive()))
            for run in self.alive():
                await self.end(run, run.outcome("requeued", OUT_OF_TIME))
        except Exception as exc:  # escaped the steps' guards: a bug, met by every document left
            log.exception("ingestion_batch_error", documents=len(self.alive()))
            for run in self.alive():
                await self.guard(run, _raise(exc))

    async def embed(self) -> None:
        runs = self.alive()
        if len(runs) > 1:
            try:
                await self._embed(runs)
                return
            except SoftTimeLimitExceeded:
                raise
            except Exception:
                # Which document the model or provider refused is unknown: each one alone.
                log.warning("ingestion_batch_embed_failed", documents=len(runs), exc_info=True)
        for run in runs:
            await self.guard(run, self._embed([run]))

    async def _embed(self, runs: list[DocumentRun]) -> None:
        mark = time.perf_counter()
        embedder = self.tools.embedder
        texts = [text for run in runs for text in run.texts]
        counts = [count for run in runs for count in run.token_counts]
        # The chunker already tokenized every chunk to count it: the local model takes those
        # ids instead of tokenizing the same texts again.
        ids: list[list[int]] | None = None
        embed_ids = getattr(embedder, "embed_token_ids", None)
        if embed_ids is not None and all(run.token_ids is not None for run in runs):
            ids = [token_ids for run in runs for token_ids in run.token_ids or []]
        vectors = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
        done = 0
        for group in length_groups(counts):
            if ids is not None and embed_ids is not None:
                vectors[group] = embed_ids([ids[i] for i in group])
            else:
                vectors[group] = embedder.embed([texts[i] for i in group])
            done += len(group)
            if done < len(texts):
                span = STAGE_PERCENT["store"] - STAGE_PERCENT["embed"]
                percent = STAGE_PERCENT["embed"] + span * done // len(texts)
                await runs[0].progress("embed", percent)  # solo runs only
                await self.heartbeat()
        elapsed = time.perf_counter() - mark
        total = sum(run.tokens for run in runs) or 1
        offset = 0
        for run in runs:
            run.vectors = vectors[offset : offset + len(run.texts)]
            offset += len(run.texts)
        for run in runs:
            # The model's time is shared by the documents in proportion to their tokens.
            await self.guard(run, run.embedded(ms(elapsed * run.tokens / total)))

    async def store(self) -> None:
        pending = self.alive()
        while pending:
            try:
                async with self.res.vector_pool.connection() as conn:
                    while pending:
                        run = pending.pop(0)
                        await self.guard(run, run.store(conn))
                        await self.heartbeat()
                        if id(run) in self.outcomes and self.outcomes[id(run)].status == "retry":
                            # The connection may be what broke (a reset): the next document
                            # gets a fresh one rather than meeting the dead one.
                            break
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # no connection: every document not stored yet meets it
                for run in pending:
                    await self.guard(run, _raise(exc))
                pending = []
        # The chunks are committed: from now on a search must not be answered from the cache,
        # before the quota is counted or the rows say ``ready`` (even if a newer run takes a
        # row over). One version bump per collection, for all its documents of the batch.
        stored = [run for run in self.alive() if run.stored]
        collections = {(run.tenant_id, run.claimed.collection_id) for run in stored}
        try:
            for tenant, collection in sorted(collections):
                await bump_collection_version(self.res.redis, tenant, collection)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            for run in stored:
                await self.guard(run, _raise(exc))
            return
        for run in stored:
            await self.guard(run, run.stored_and_visible())

    async def finish(self, started: float) -> None:
        total_ms = ms(time.perf_counter() - started)
        for run in self.alive():
            # One transaction per document: a deadlock or a fault retries or fails that
            # document alone, never the other tenants' documents of the batch.
            await self.guard(run, self._finish(run, total_ms))

    async def _finish(self, run: DocumentRun, total_ms: float) -> None:
        async with unit_of_work(self.res.sessionmaker) as session:
            mine = await run.finish(session, total_ms)
            # The document's settlements in the transaction that makes it ``ready`` (counted
            # if and only if the row says so). Written even when a newer run took the row
            # over: the work was done.
            await run.quota.flush(within=session)
        self.outcomes[id(run)] = run.outcome("ready" if mine else "superseded")

    async def close(self) -> None:
        """Give back what the documents hold; after :meth:`run`, even when it was cancelled
        (the rows of a cancelled run are left to this job's next delivery or the sweeper)."""
        for run in self.runs:
            await _quietly(run.release())
            # Work settled before a failure (embedding tokens spent) is written before the
            # task ends, not left queued in this process (a no-op when it was written).
            await _quietly(run.quota.flush())


async def _raise(exc: BaseException) -> None:
    raise exc


async def _quietly(step: Awaitable[Any]) -> None:
    try:
        await step
    except SoftTimeLimitExceeded:
        raise
    except Exception:  # the document's own outcome matters more than this one
        log.warning("ingestion_cleanup_failed", exc_info=True)


async def _guarded(run: DocumentRun, step: Awaitable[Any], *, alone: bool) -> Outcome | None:
    """Await one document's step; None when it went through, else the document's outcome
    (it is failed on the row where it should be). The worker's soft time limit fails a
    document that ran ``alone``; in a batch it is raised again."""
    tenant_id, document_id = str(run.tenant_id), str(run.document_id)
    try:
        await step
        return None
    except Superseded:
        log.info("ingestion_superseded", tenant_id=tenant_id, document_id=document_id)
        return run.outcome("superseded")
    except RunAlone:
        return run.outcome("requeued", TOO_LARGE)
    except (BadDocument, QuotaExceeded) as exc:
        reason = exc.message
    except EmbeddingError as exc:
        if exc.transient:
            return _retry(run, exc)
        reason = f"The embedding provider refused this document: {exc}"
    except (SoftTimeLimitExceeded, MemoryError) as exc:
        if isinstance(exc, SoftTimeLimitExceeded) and not alone:
            raise
        # The worker's own limits (chunking or embedding a huge text): this document fails,
        # the worker goes on; retrying would only meet the same limit.
        what = "time" if isinstance(exc, SoftTimeLimitExceeded) else "memory"
        reason = (
            f"Processing needed more {what} than the worker allows per document; split it "
            "into smaller files and upload those"
        )
    except Exception as exc:
        if is_transient(exc):
            return _retry(run, exc)
        log.exception("ingestion_error", tenant_id=tenant_id, document_id=document_id)
        reason = (
            f"An unexpected error stopped processing ({type(exc).__name__}); re-index the "
            f"document to try again, or contact support quoting document id {document_id}"
        )
    try:
        await run.fail(reason)
    except Exception as exc:
        if is_transient(exc):
            return _retry(run, exc)
        log.exception("ingestion_fail_write_error", document_id=document_id)
    return run.outcome("failed", reason)


def _retry(run: DocumentRun, exc: Exception) -> Outcome:
    log_retry(run.tenant_id, run.document_id, exc)
    return run.outcome("retry", public_reason(exc))


def log_retry(tenant_id: uuid.UUID, document_id: uuid.UUID, exc: Exception) -> None:
    """Log a transient fault of a document (its details: the row gets ``public_reason``)."""
    log.warning(
        "ingestion_retry",
        tenant_id=str(tenant_id),
        document_id=str(document_id),
        error=f"{type(exc).__name__}: {exc}",
    )
