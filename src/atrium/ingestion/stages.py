"""One document's part in a processing run: read and chunk it, hold its quota, store its
chunks, and the fenced writes of its row.

``ingestion.pipeline`` runs these for every document a run holds: each document is read,
chunked, held, stored and finished on its own (one document's failure is its own), while the
embedding of all of them goes to the model in shared batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg import AsyncConnection

from atrium.billing.quota import Metric, Quota, Reservation, adjust
from atrium.ingestion import detect, sandbox
from atrium.ingestion import extract as extraction
from atrium.ingestion.exceptions import BadDocument, RunAlone, Superseded
from atrium.ingestion.repository import Claimed, DocumentRepository
from atrium.ingestion.tools import Tools
from atrium.ingestion.vectorstore import replace_document_chunks
from atrium.kit.blobstore import get_blobstore
from atrium.kit.db import unit_of_work
from atrium.kit.runtime import Resources

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from atrium.config import Settings

#: Percent reached when each stage starts.
STAGE_PERCENT = {"extract": 0, "chunk": 10, "embed": 20, "store": 90}
#: Minimum seconds between two progress writes of one run.
PROGRESS_INTERVAL = 1.0
#: Above this many characters of text a document takes seconds: every stage boundary is shown.
LARGE_TEXT_CHARS = 20_000


@dataclass
class Outcome:
    """How a document's run ended: ``ready``, ``failed``, ``skipped`` (nothing to do),
    ``superseded``, ``retry`` (a transient fault; ``error`` says which) or ``requeued`` (a
    batch gave it back to the queue unfinished, to run with a job of its own; ``error`` is
    the note its row shows)."""

    status: str
    chunks: int = 0
    tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    document_id: str | None = None
    tenant_id: str | None = None

    def as_result(self) -> dict[str, Any]:
        """The task result's entry for this document (``kit.metrics`` counts it)."""
        return {
            "document_id": self.document_id,
            "status": self.status,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "timings": self.timings,
        }


def ms(seconds: float) -> float:
    """Milliseconds, rounded for the row's ``timings``."""
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
    placeholders = {filename} if filename else {"Untitled", detect.fallback_title(data)}
    return found[:500] if current in placeholders else current


class DocumentRun:
    """One document of a processing run, from its claim to ``ready`` or ``failed``.

    Attributes:
        claimed: what the claim read of the document.
        texts, token_counts, token_ids: its chunks, once :meth:`prepare` ran.
        vectors: their embeddings, set by the pipeline.
    """

    def __init__(
        self,
        res: Resources,
        tools: Tools,
        claimed: Claimed,
        run_id: str,
        quota: Quota,
        *,
        solo: bool,
        text_limit: int | None = None,
    ) -> None:
        self.res = res
        self.tools = tools
        self.claimed = claimed
        self.tenant_id = claimed.tenant_id
        self.document_id = claimed.document_id
        self.run_id = run_id
        # The run's quota engine, shared by its documents: each document holds and settles its
        # own amounts, and their settlements are written together in the ``ready`` transaction.
        self.quota = quota
        #: The only document of its run: its row shows every stage (a batch's rows show the
        #: claim and the end, and the run's heartbeat meanwhile).
        self.solo = solo
        #: Characters of text above which the document leaves the batch to run alone (for
        #: documents a run adopted: the size rule of adoption is the upload's, not its text's).
        self.text_limit = text_limit
        #: Whether :meth:`prepare` began (reading the file counts as an attempt).
        self.started = False
        self.timings: dict[str, float] = {}
        self.texts: list[str] = []
        self.token_counts: list[int] = []
        self.token_ids: list[list[int]] | None = None
        self.vectors: np.ndarray[Any, Any] | None = None
        self.tokens = 0
        self.title = claimed.title
        self.metadata: dict[str, Any] = {}
        self.stored = False
        self._held: list[Reservation] = []
        self._settled: set[int] = set()
        self._last_write = time.monotonic()
        self._large = False
        if claimed.queued_since is not None:
            wait = (claimed.started_at - claimed.queued_since).total_seconds()
            self.timings["queue_ms"] = ms(max(0.0, wait))

    async def progress(self, stage: str, percent: int) -> None:
        """Show the stage on the row (solo runs; at most once a second unless large)."""
        if not self.solo:
            return
        now = time.monotonic()
        if not self._large and now - self._last_write < PROGRESS_INTERVAL:
            return
        async with unit_of_work(self.res.sessionmaker) as session:
            mine = await DocumentRepository(session, self.tenant_id).progress(
                self.document_id, self.run_id, stage, percent
            )
        self._last_write = now
        if not mine:
            raise Superseded()

    async def still_owned(self) -> bool:
        """Whether this run may still write the document's chunks."""
        async with self.res.sessionmaker() as session:
            return await DocumentRepository(session, self.tenant_id).owned(
                self.document_id, self.run_id
            )

    async def prepare(self) -> None:
        """Extract and chunk the document, then hold its quota (tokens and added chunks).

        Raises:
            BadDocument: nothing to index, or the file is unreadable or missing.
            QuotaExceeded: the plan has no room for it.
            RunAlone: its text is over ``text_limit``.
        """
        self.started = True
        mark = time.perf_counter()
        try:
            data = await get_blobstore(self.res.settings).get(self.claimed.blob_key)
        except FileNotFoundError:
            raise BadDocument(
                "The uploaded file is missing from storage; delete this document and upload "
                "the file again"
            ) from None
        # Parsed in a child process bounded in memory and time (a crafted file fails this
        # document, never the worker): see ``ingestion.sandbox``.
        extracted = sandbox.extract_isolated(
            data, self.claimed.content_type, sandbox_limits(self.res.settings)
        )
        self.title = final_title(self.claimed.title, self.claimed.filename, extracted.title, data)
        self.metadata = {**self.claimed.metadata, "title": self.title}
        del data
        if self.text_limit is not None and len(extracted.text) > self.text_limit:
            raise RunAlone()
        self._large = len(extracted.text) > LARGE_TEXT_CHARS
        self.timings["extract_ms"] = ms(time.perf_counter() - mark)
        await self.progress("chunk", STAGE_PERCENT["chunk"])

        mark = time.perf_counter()
        chunks = self.tools.chunker.split(extracted.text, markdown=extracted.markdown)
        if not chunks:
            raise BadDocument("The document has no text to index")
        self.texts = [chunk.text for chunk in chunks]
        self.token_counts = [chunk.token_count for chunk in chunks]
        if self.tools.reuse_token_ids and all(chunk.token_ids is not None for chunk in chunks):
            self.token_ids = [chunk.token_ids or [] for chunk in chunks]
        self.tokens = sum(self.token_counts)
        self.timings["chunk_ms"] = ms(time.perf_counter() - mark)
        await self.progress("embed", STAGE_PERCENT["embed"])

        # Plan limits (billing): the embedding tokens, and the chunks this run adds over the
        # previous run's, are held together (one Redis script, which also checks that the
        # plan snapshot kept in this process is still current) and counted after.
        added = len(self.texts) - self.claimed.chunk_count
        self._held = await self.quota.hold(
            self.tenant_id,
            [(Metric.embedding_tokens, self.tokens), (Metric.chunks, max(0, added))],
            ttl_seconds=3600,
        )

    async def embedded(self, embed_ms: float) -> None:
        """The vectors are in: the tokens are spent (settled with the ``ready`` write)."""
        self.timings["embed_ms"] = embed_ms
        await self._settle(0)
        await self.progress("store", STAGE_PERCENT["store"])

    async def store(self, conn: AsyncConnection[Any]) -> None:
        """Replace the document's chunks in its tenant's partition, in one transaction.

        Raises:
            Superseded: the run lost the document (re-run, deleted) before writing.
        """
        assert self.vectors is not None
        mark = time.perf_counter()
        written = await replace_document_chunks(
            conn,
            tenant_id=self.tenant_id,
            collection_id=self.claimed.collection_id,
            document_id=self.document_id,
            texts=self.texts,
            token_counts=self.token_counts,
            embeddings=self.vectors,
            metadata=self.metadata,
            still_owned=self.still_owned,
            language=self.claimed.language,
        )
        self.timings["store_ms"] = ms(time.perf_counter() - mark)
        if not written:
            raise Superseded()
        self.stored = True

    async def stored_and_visible(self) -> None:
        """After the collection's cache version moved past the chunks: count them."""
        await self._settle(1)
        added = len(self.texts) - self.claimed.chunk_count
        if added < 0:
            # A re-index that made fewer chunks gives the difference back.
            await adjust(self.quota, self.tenant_id, Metric.chunks, added)

    async def finish(self, session: AsyncSession, total_ms: float) -> bool:
        """Mark the document ``ready`` in ``session``; False when the run lost it."""
        self.timings["total_ms"] = total_ms
        return await DocumentRepository(session, self.tenant_id).finish(
            self.document_id,
            self.run_id,
            chunk_count=len(self.texts),
            token_count=self.tokens,
            timings=self.timings,
            title=self.title if self.title != self.claimed.title else None,
        )

    async def fail(self, reason: str) -> None:
        """Mark the document failed, if this run still owns it."""
        self.timings.pop("total_ms", None)
        async with unit_of_work(self.res.sessionmaker) as session:
            await DocumentRepository(session, self.tenant_id).fail(
                self.document_id, self.run_id, reason, self.timings
            )

    async def release(self) -> None:
        """Give back what was held and not settled (work not done)."""
        for index, reservation in enumerate(self._held):
            if index not in self._settled:
                self._settled.add(index)
                await reservation.release()

    async def _settle(self, index: int) -> None:
        if index < len(self._held) and index not in self._settled:
            self._settled.add(index)
            # Written with the ``ready`` transaction (the hold keeps the capacity till then).
            await self._held[index].record_later()

    def outcome(self, status: str, error: str | None = None) -> Outcome:
        """This document's outcome."""
        ready = status == "ready"
        return Outcome(
            status,
            len(self.texts) if ready else 0,
            self.tokens if ready else 0,
            self.timings,
            error,
            str(self.document_id),
            str(self.tenant_id),
        )
