"""The ingestion pipeline of one document: extract → chunk → embed → store.

Runs inside a Celery task (``atrium.ingestion.process_document``). Each run claims the document
with a fresh ``run_id``; all its later writes are fenced on it (see ``repository``), and the
chunks are replaced in one transaction (see ``vectorstore``). So a task delivered twice, a run
interrupted by a crash and then re-run, or a re-index racing a running job all end with exactly
one set of chunks and a consistent row.

The row is updated at stage boundaries, at most about once a second (a small document goes
from ``processing`` to ``ready`` without intermediate writes; a large one shows its stage and
percent, and its heartbeat keeps the stuck-job sweeper away).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
import psycopg_pool
import redis.exceptions
import sqlalchemy.exc
import structlog
from celery.exceptions import SoftTimeLimitExceeded

from atrium.billing.quota import Metric, Quota, QuotaExceeded, adjust
from atrium.ingestion import extract as extraction
from atrium.ingestion import sandbox
from atrium.ingestion.embedders import Tools
from atrium.ingestion.embedding import EmbeddingError
from atrium.ingestion.exceptions import BadDocument, Superseded
from atrium.ingestion.repository import DocumentRepository
from atrium.ingestion.vectorstore import replace_document_chunks
from atrium.kit.blobstore import get_blobstore
from atrium.kit.cache_versions import bump_collection_version
from atrium.kit.db import unit_of_work
from atrium.kit.errors import outage_of
from atrium.kit.runtime import Resources

if TYPE_CHECKING:
    from atrium.config import Settings

log = structlog.get_logger("atrium.ingestion")

#: Percent reached when each stage starts.
STAGE_PERCENT = {"extract": 0, "chunk": 10, "embed": 20, "store": 90}
#: Texts per embedder call: large enough to batch well, small enough to report progress.
EMBED_SLICE = 128
#: Minimum seconds between two progress writes of one run.
PROGRESS_INTERVAL = 1.0
#: Above this many characters of text a document takes seconds: every stage boundary is shown.
LARGE_TEXT_CHARS = 20_000


class TransientFailure(Exception):
    """A fault that may go away (database, broker, provider): the task retries later.

    Attributes:
        run_id: the run that met it (None before the document was claimed).
    """

    def __init__(self, message: str, run_id: str | None) -> None:
        super().__init__(message)
        self.run_id = run_id


def public_reason(exc: BaseException) -> str:
    """What the tenant may read about a transient fault: the component, not its details.

    The exception's own text names hosts, ports and driver internals; it goes to the log
    (``ingestion_retry``), the document's ``error`` gets this.
    """
    if isinstance(exc, EmbeddingError):
        return "the embedding provider was unavailable"
    component = outage_of(exc)
    return f"{component} was unavailable" if component else "a connection failed"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed."""
    if isinstance(exc, EmbeddingError):
        return exc.transient
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        (
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.TimeoutError,
            psycopg.OperationalError,
            psycopg_pool.PoolTimeout,
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            ConnectionError,
            TimeoutError,
        ),
    ) or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))


@dataclass
class Outcome:
    """How a run ended: ``ready``, ``failed``, ``skipped`` (nothing to do) or ``superseded``."""

    status: str
    chunks: int = 0
    tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None


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


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def sandbox_limits(settings: Settings) -> sandbox.SandboxLimits:
    """The bounds of reading one document, from settings."""
    return sandbox.SandboxLimits(
        seconds=float(settings.ingestion_extract_timeout_seconds),
        memory_bytes=settings.ingestion_extract_memory_mb * 1024 * 1024,
        extract=extraction.Limits(
            max_pdf_pages=settings.ingestion_max_pdf_pages,
            max_inflated_bytes=settings.ingestion_max_inflated_mb * 1024 * 1024,
        ),
    )


def final_title(current: str, filename: str | None, found: str | None, data: bytes) -> str:
    """The title a document keeps once its text is extracted.

    An upload without a ``title`` is named after its file (or, for JSON text, its first line,
    or ``Untitled``) until the worker has read it; then the document's own title (PDF or DOCX
    properties, HTML ``<title>``, first heading) replaces that name. A title the client gave
    is kept, unless it is exactly that placeholder.
    """
    if not found:
        return current
    placeholders = {filename} if filename else {"Untitled", extraction.fallback_title(data)}
    return found[:500] if current in placeholders else current


class _Run:
    """One processing run of one document."""

    def __init__(
        self, res: Resources, tools: Tools, tenant_id: uuid.UUID, document_id: uuid.UUID
    ) -> None:
        self.res = res
        self.tools = tools
        self.tenant_id = tenant_id
        self.document_id = document_id
        self.run_id = str(uuid.uuid4())
        self.timings: dict[str, float] = {}
        # The run's own quota engine: its holds (one script for both metrics) check the plan
        # snapshot kept in this process against Redis, so a plan change applies from the next
        # document, and its two settlements (embedding tokens, chunks) go to MySQL in one batched
        # transaction, written before the run reports ``ready`` (see ``run``), instead of one
        # transaction each: ~20 ms of CPU less per news article, 5% of its whole cost.
        self.quota = Quota.of(res)
        self._last_write = time.monotonic()
        self._large = False

    async def _progress(self, stage: str, percent: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self._large) and now - self._last_write < PROGRESS_INTERVAL:
            return
        async with unit_of_work(self.res.sessionmaker) as session:
            mine = await DocumentRepository(session, self.tenant_id).progress(
                self.document_id, self.run_id, stage, percent
            )
        self._last_write = now
        if not mine:
            raise Superseded()

    async def _still_owned(self) -> bool:
        async with self.res.sessionmaker() as session:
            return await DocumentRepository(session, self.tenant_id).owned(
                self.document_id, self.run_id
            )

    async def _embed(
        self,
        texts: list[str],
        token_counts: list[int],
        token_ids: list[list[int]] | None,
    ) -> np.ndarray[Any, Any]:
        embedder = self.tools.embedder
        # The chunker already tokenized every chunk to count it: the local model takes those
        # ids instead of tokenizing the same texts again.
        embed_ids = getattr(embedder, "embed_token_ids", None) if token_ids is not None else None
        vectors = np.zeros((len(texts), embedder.dimension), dtype=np.float32)
        done = 0
        for group in length_groups(token_counts):
            if embed_ids is not None and token_ids is not None:
                vectors[group] = embed_ids([token_ids[i] for i in group])
            else:
                vectors[group] = embedder.embed([texts[i] for i in group])
            done += len(group)
            if done < len(texts):
                span = STAGE_PERCENT["store"] - STAGE_PERCENT["embed"]
                await self._progress("embed", STAGE_PERCENT["embed"] + span * done // len(texts))
        return vectors

    async def run(self, max_attempts: int, retried: int) -> Outcome:
        started = time.perf_counter()
        async with unit_of_work(self.res.sessionmaker) as session:
            repo = DocumentRepository(session, self.tenant_id)
            document = await repo.claim(self.document_id, self.run_id)
            if document is None:
                return Outcome("skipped")
            # Runs that ended in a recorded retry (``retried``: an outage) did finish: only
            # the others count, the runs a dying worker never ended.
            if document.attempts - retried > max_attempts:
                reason = (
                    f"Processing was started {document.attempts - 1 - retried} times without "
                    "finishing "
                    "(the worker stopped each time, e.g. out of memory or time); the document "
                    "may be too large. Split it into smaller files, or re-index it to try again."
                )
                await repo.fail(self.document_id, self.run_id, reason, {})
                return Outcome("failed", error=reason)
            collection_id = document.collection_id
            old_chunks = document.chunk_count
            blob_key = document.blob_key
            content_type = document.content_type
            user_metadata = document.metadata
            title, filename = document.title, document.filename
            queued_since = document.queued_since
            if queued_since is not None:
                wait = (document.started_at - queued_since).total_seconds()
                self.timings["queue_ms"] = _ms(max(0.0, wait))

        # extract
        mark = time.perf_counter()
        try:
            data = await get_blobstore(self.res.settings).get(blob_key)
        except FileNotFoundError:
            raise BadDocument(
                "The uploaded file is missing from storage; delete this document and upload "
                "the file again"
            ) from None
        # Parsed in a child process bounded in memory and time (a crafted file fails this
        # document, never the worker): see ``ingestion.sandbox``.
        extracted = sandbox.extract_isolated(data, content_type, sandbox_limits(self.res.settings))
        new_title = final_title(title, filename, extracted.title, data)
        metadata = {**user_metadata, "title": new_title}
        del data
        self._large = len(extracted.text) > LARGE_TEXT_CHARS
        self.timings["extract_ms"] = _ms(time.perf_counter() - mark)
        await self._progress("chunk", STAGE_PERCENT["chunk"])

        # chunk
        mark = time.perf_counter()
        chunks = self.tools.chunker.split(extracted.text, markdown=extracted.markdown)
        if not chunks:
            raise BadDocument("The document has no text to index")
        texts = [chunk.text for chunk in chunks]
        token_counts = [chunk.token_count for chunk in chunks]
        token_ids: list[list[int]] | None = None
        if self.tools.reuse_token_ids and all(chunk.token_ids is not None for chunk in chunks):
            token_ids = [chunk.token_ids or [] for chunk in chunks]
        self.timings["chunk_ms"] = _ms(time.perf_counter() - mark)
        await self._progress("embed", STAGE_PERCENT["embed"])

        # embed
        mark = time.perf_counter()
        # Plan limits (billing): the embedding tokens, and the chunks this run adds over the
        # previous run's, are held together (one Redis script, which also checks that the
        # plan snapshot kept in this process is still current) and counted after.
        tokens = sum(token_counts)
        added = len(texts) - old_chunks
        quota = self.quota
        held_tokens, held_chunks = await quota.hold(
            self.tenant_id,
            [(Metric.embedding_tokens, tokens), (Metric.chunks, max(0, added))],
            ttl_seconds=3600,
        )
        tokens_settled = chunks_settled = False
        try:
            vectors = await self._embed(texts, token_counts, token_ids)
            # Written with the chunks' settlement below (the hold keeps the capacity till then).
            await held_tokens.record_later()
            tokens_settled = True
            self.timings["embed_ms"] = _ms(time.perf_counter() - mark)
            await self._progress("store", STAGE_PERCENT["store"])

            # store
            mark = time.perf_counter()
            async with self.res.vector_pool.connection() as conn:
                written = await replace_document_chunks(
                    conn,
                    tenant_id=self.tenant_id,
                    collection_id=collection_id,
                    document_id=self.document_id,
                    texts=texts,
                    token_counts=token_counts,
                    embeddings=vectors,
                    metadata=metadata,
                    still_owned=self._still_owned,
                )
            if not written:
                raise Superseded()
            # The chunks are committed: from now on a search must not be answered from the
            # cache, before the quota is counted or the row says ``ready`` (and even if a newer
            # run takes the row over).
            await bump_collection_version(self.res.redis, self.tenant_id, collection_id)
            await held_chunks.record_later()
            chunks_settled = True
        finally:
            # Work not done gives its hold back (tokens once embedded are spent either way).
            if not tokens_settled:
                await held_tokens.release()
            if not chunks_settled:
                await held_chunks.release()
        if added < 0:
            # A re-index that made fewer chunks gives the difference back.
            await adjust(quota, self.tenant_id, Metric.chunks, added)
        self.timings["store_ms"] = _ms(time.perf_counter() - mark)
        self.timings["total_ms"] = _ms(time.perf_counter() - started)
        async with unit_of_work(self.res.sessionmaker) as session:
            finished = await DocumentRepository(session, self.tenant_id).finish(
                self.document_id,
                self.run_id,
                chunk_count=len(texts),
                token_count=tokens,
                timings=self.timings,
                title=new_title if new_title != title else None,
            )
            # Both settlements of this document in the transaction that makes it ``ready``
            # (counted if and only if the row says so; one transaction less per document).
            # Written even when a newer run took the row over: the work was done.
            await quota.flush(within=session)
        if not finished:
            raise Superseded()
        return Outcome("ready", len(texts), tokens, self.timings)

    async def fail(self, reason: str) -> None:
        """Mark the document failed, if this run still owns it."""
        self.timings.pop("total_ms", None)
        async with unit_of_work(self.res.sessionmaker) as session:
            await DocumentRepository(session, self.tenant_id).fail(
                self.document_id, self.run_id, reason, self.timings
            )


async def process(
    res: Resources,
    tools: Tools,
    tenant_id: uuid.UUID,
    document_id: uuid.UUID,
    *,
    max_attempts: int,
    retried: int = 0,
) -> Outcome:
    """Process one document end to end.

    Args:
        res: the process's resources.
        tools: extraction, chunking and embedding tools.
        tenant_id: the document's tenant.
        document_id: the document.
        max_attempts: runs that may stop without finishing (a worker killed: out of memory
            or time) before the document fails instead of being started again.
        retried: runs of this job that ended in a retry after a transient fault; they are
            among the document's ``attempts`` but finished, so they do not count toward
            ``max_attempts``.

    Returns:
        The outcome (``ready``, ``failed``, ``skipped`` or ``superseded``).

    Raises:
        TransientFailure: for faults worth retrying later; the document is left to the retry.
    """
    run = _Run(res, tools, tenant_id, document_id)
    try:
        return await run.run(max_attempts, retried)
    except Superseded:
        log.info("ingestion_superseded", tenant_id=str(tenant_id), document_id=str(document_id))
        return Outcome("superseded")
    except (BadDocument, QuotaExceeded) as exc:
        await run.fail(exc.message)
        return Outcome("failed", timings=run.timings, error=exc.message)
    except EmbeddingError as exc:
        if exc.transient:
            raise _transient(run, exc) from exc
        reason = f"The embedding provider refused this document: {exc}"
        await run.fail(reason)
        return Outcome("failed", timings=run.timings, error=reason)
    except (SoftTimeLimitExceeded, MemoryError) as exc:
        # The worker's own limits (chunking or embedding a huge text): this document fails,
        # the worker goes on; retrying would only meet the same limit.
        what = "time" if isinstance(exc, SoftTimeLimitExceeded) else "memory"
        reason = (
            f"Processing needed more {what} than the worker allows per document; split it "
            "into smaller files and upload those"
        )
        await run.fail(reason)
        return Outcome("failed", timings=run.timings, error=reason)
    except Exception as exc:
        if is_transient(exc):
            raise _transient(run, exc) from exc
        log.exception("ingestion_error", tenant_id=str(tenant_id), document_id=str(document_id))
        reason = (
            f"An unexpected error stopped processing ({type(exc).__name__}); re-index the "
            f"document to try again, or contact support quoting document id {document_id}"
        )
        try:
            await run.fail(reason)
        except Exception:  # the original error matters more than this one
            log.exception("ingestion_fail_write_error", document_id=str(document_id))
        raise
    finally:
        # Work settled before a failure (embedding tokens spent) is written before the task
        # ends, not left queued in this process (a no-op when the run flushed already).
        await run.quota.flush()


def _transient(run: _Run, exc: Exception) -> TransientFailure:
    log.warning(
        "ingestion_retry",
        tenant_id=str(run.tenant_id),
        document_id=str(run.document_id),
        error=f"{type(exc).__name__}: {exc}",
    )
    return TransientFailure(public_reason(exc), run.run_id)


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
