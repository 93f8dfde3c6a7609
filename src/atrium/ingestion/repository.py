"""SQL of documents, always scoped to one tenant.

The worker's writes are *fenced*: each processing run stamps the row with its own ``run_id``
when it claims the document, and every later write of that run matches on it. A run that lost
the document (a re-delivered task claimed it again, or it is being deleted) changes nothing.

A run may hold several documents (its task's own and queued ones it adopted, see
``ingestion.pipeline``); they all carry the same ``run_id``. A run id starts with its *job*, the
Celery message it runs for (see :func:`new_run_id`), so a message delivered again after its
worker died recognises the documents its dead run held.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.repository import TenantRepository
from atrium.models.base import utcnow
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus
from atrium.models.tenancy import Tenant, TenantStatus

#: Hex digits of the job in a run id (64 random bits of a Celery task id).
JOB_CHARS = 17


def requeued(note: str | None) -> dict[str, Any]:
    """The columns of a document handed back to the queue, with ``note`` as its message."""
    return {
        "status": DocumentStatus.queued,
        "stage": None,
        "progress": 0,
        "error": note,
        "run_id": None,
        "heartbeat_at": utcnow(),
    }


def job_key(task_id: str | None) -> str:
    """The job part of a run id for a Celery task id (a random one without a task)."""
    digits = (task_id or "").replace("-", "").lower()
    if len(digits) < JOB_CHARS or any(c not in "0123456789abcdef" for c in digits):
        digits = uuid.uuid4().hex
    return digits[:JOB_CHARS]


def new_run_id(job: str) -> str:
    """A fresh run id of ``job``: ``<job, 17 hex>-<18 random hex>`` (36 characters, the
    column's size). Fresh per run, so a run that was thought dead but still writes is fenced
    off by its successor of the same job."""
    return f"{job}-{secrets.token_hex(9)}"


def job_of(run_id: str | None) -> str | None:
    """The job a run id belongs to (None for ids of another form)."""
    if run_id is None or len(run_id) != 36 or run_id[JOB_CHARS] != "-":
        return None
    return run_id[:JOB_CHARS]


@dataclass(frozen=True)
class Claimed:
    """What a processing run needs of the document it claimed (see ``claim``)."""

    document_id: uuid.UUID
    tenant_id: uuid.UUID
    size_bytes: int
    attempts: int
    collection_id: uuid.UUID
    chunk_count: int
    blob_key: str
    content_type: str
    metadata: dict[str, Any]
    title: str
    started_at: dt.datetime
    #: The uploaded file's name (the title's placeholder until the text is read).
    filename: str | None
    #: When it was queued (its previous heartbeat).
    queued_since: dt.datetime | None
    #: The collection's full-text language (the chunks' text search configuration).
    language: str


class DocumentRepository(TenantRepository[Document]):
    """Documents of one tenant."""

    model = Document

    async def get(
        self,
        id: uuid.UUID,
        collection_id: uuid.UUID | None = None,
        *,
        for_update: bool = False,
    ) -> Document | None:
        """The document, if it belongs to the tenant (and to the collection, when given)."""
        if collection_id is None:
            return await super().get(id, for_update=for_update)
        query = self.select().where(Document.id == id, Document.collection_id == collection_id)
        if for_update:
            query = query.with_for_update()
        return (await self.session.execute(query)).scalar_one_or_none()

    async def by_sha(self, collection_id: uuid.UUID, sha256: str) -> Document | None:
        """The live document of the collection with these bytes, if any."""
        query = self.select().where(
            Document.collection_id == collection_id, Document.sha256 == sha256
        )
        return (await self.session.execute(query)).scalar_one_or_none()

    def list_query(
        self, collection_id: uuid.UUID, status: DocumentStatus | None = None
    ) -> Select[Any]:
        """The collection's documents, newest first, optionally of one status."""
        query = self.select().where(Document.collection_id == collection_id)
        if status is not None:
            query = query.where(Document.status == status)
        return query.order_by(Document.created_at.desc(), Document.id)

    async def ids_in_collection(self, collection_id: uuid.UUID) -> list[tuple[uuid.UUID, str]]:
        """``(id, blob_key)`` of every document of a collection."""
        rows = await self.session.execute(
            self.select(Document.id, Document.blob_key).where(
                Document.collection_id == collection_id
            )
        )
        return [(row[0], row[1]) for row in rows]

    async def live_totals(self, collection_id: uuid.UUID) -> tuple[int, int, int]:
        """``(documents, bytes, chunks)`` of the collection's documents not being deleted
        (what they count against the plan; those deleted one by one were given back already).
        """
        row = (
            await self.session.execute(
                self.select(
                    func.count(),
                    func.coalesce(func.sum(Document.size_bytes), 0),
                    func.coalesce(func.sum(Document.chunk_count), 0),
                ).where(
                    Document.collection_id == collection_id,
                    Document.status != DocumentStatus.deleting,
                )
            )
        ).one()
        return int(row[0]), int(row[1]), int(row[2])

    async def in_progress(self) -> int:
        """How many of the tenant's documents are queued or processing."""
        return await self.count(
            Document.status.in_([DocumentStatus.queued, DocumentStatus.processing])
        )

    async def mark_collection_deleting(self, collection_id: uuid.UUID) -> None:
        """Put every document of a collection in ``deleting`` (their processing stops)."""
        await self.session.execute(
            update(Document)
            .where(self.scope, Document.collection_id == collection_id)
            .values(status=DocumentStatus.deleting, sha256=None, run_id=None, stage=None)
        )

    # The worker's fenced writes ------------------------------------------------------------

    def _mine(self, document_id: uuid.UUID, run_id: str) -> Any:
        return (
            Document.id == document_id,
            self.scope,
            Document.run_id == run_id,
            Document.status == DocumentStatus.processing,
        )

    async def claim(
        self, document_id: uuid.UUID, run_id: str, *, live_after: dt.datetime | None = None
    ) -> Claimed | None:
        """Start a processing run: the document becomes ``processing`` and owned by ``run_id``.

        A document already ``processing`` is taken over when its run belongs to the same job
        (the message came back because its worker died), has no job, or has shown no sign of
        life since ``live_after``; a live run of another job keeps it (it adopted the document
        and the message that wins it back after a crash is that job's own).

        Returns what the run needs of the document, or None when there is nothing to do (gone,
        being deleted, already ready or failed, held by another live run, or its collection or
        tenant is being deleted). Plain columns and one UPDATE, not an ORM object and its
        flush: this runs once per document.
        """
        row = (
            await self.session.execute(
                self.select(*CLAIM_COLUMNS, Document.run_id)
                .join(Collection, Collection.id == Document.collection_id)
                .where(Document.id == document_id)
                .with_for_update()
            )
        ).one_or_none()
        if row is None:
            return None
        held_by = row[-1]
        if row.status is DocumentStatus.processing and held_by is not None:
            mine = job_of(held_by) == job_of(run_id)
            alive = live_after is not None and (row.heartbeat_at or live_after) > live_after
            if not mine and alive and job_of(held_by) is not None:
                return None
        return await start_claimed(self.session, row, run_id)

    async def progress(self, document_id: uuid.UUID, run_id: str, stage: str, percent: int) -> bool:
        """Record the run's stage and percent; False when the run no longer owns the document."""
        result = await self.session.execute(
            update(Document)
            .where(*self._mine(document_id, run_id))
            .values(stage=stage, progress=percent, heartbeat_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))

    async def owned(self, document_id: uuid.UUID, run_id: str) -> bool:
        """Whether the run still owns the document and neither its collection nor its tenant
        is being deleted."""
        row = (
            await self.session.execute(
                select(Document.id)
                .join(Collection, Collection.id == Document.collection_id)
                .join(Tenant, Tenant.id == Document.tenant_id)
                .where(*self._mine(document_id, run_id))
                .where(
                    Collection.status == CollectionStatus.active,
                    Tenant.status != TenantStatus.deleting,
                )
            )
        ).first()
        return row is not None

    async def finish(
        self,
        document_id: uuid.UUID,
        run_id: str,
        *,
        chunk_count: int,
        token_count: int,
        timings: dict[str, float],
        title: str | None,
    ) -> bool:
        """Mark the run's document ``ready``; False when the run no longer owns it."""
        values: dict[str, Any] = {
            "status": DocumentStatus.ready,
            "stage": None,
            "progress": 100,
            "error": None,
            "chunk_count": chunk_count,
            "token_count": token_count,
            "timings": timings,
            "run_id": None,
            "heartbeat_at": None,
            "processed_at": utcnow(),
        }
        if title:
            values["title"] = title
        result = await self.session.execute(
            update(Document).where(*self._mine(document_id, run_id)).values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    async def fail(
        self, document_id: uuid.UUID, run_id: str | None, reason: str, timings: dict[str, float]
    ) -> bool:
        """Mark the document ``failed`` with a reason (only the owning run, when given)."""
        where: Any = (
            self._mine(document_id, run_id)
            if run_id is not None
            else (
                Document.id == document_id,
                self.scope,
                Document.status.in_([DocumentStatus.queued, DocumentStatus.processing]),
            )
        )
        result = await self.session.execute(
            update(Document)
            .where(*where)
            .values(
                status=DocumentStatus.failed,
                stage=None,
                error=reason[:4000],
                timings=timings,
                run_id=None,
                heartbeat_at=None,
            )
        )
        return bool(getattr(result, "rowcount", 0))

    async def requeue(
        self,
        document_id: uuid.UUID,
        run_id: str | None,
        note: str | None,
        *,
        unstarted: bool = False,
    ) -> bool:
        """Put the document back in ``queued`` (a retry is coming), with a note why.

        Args:
            document_id: the document.
            run_id: the run that must still hold it (any queued or processing row when None).
            note: shown as the document's ``error`` until it runs.
            unstarted: the run gave the document back before reading it: its claim does not
                count as an attempt (it may be taken into a batch again).
        """
        where: Any = (
            self._mine(document_id, run_id)
            if run_id is not None
            else (
                Document.id == document_id,
                self.scope,
                Document.status.in_([DocumentStatus.queued, DocumentStatus.processing]),
            )
        )
        result = await self.session.execute(
            update(Document)
            .where(*where)
            .values(
                **requeued(note),
                **({"attempts": Document.attempts - 1} if unstarted else {}),
            )
        )
        return bool(getattr(result, "rowcount", 0))


CLAIM_COLUMNS = (
    Document.id,
    Document.tenant_id,
    Document.size_bytes,
    Document.status,
    Document.attempts,
    Document.collection_id,
    Document.chunk_count,
    Document.blob_key,
    Document.content_type,
    Document.metadata_,
    Document.title,
    Document.heartbeat_at,
    Collection.status.label("collection_status"),
    Document.filename,
    Collection.language,
    # A subquery, not a join: the claim's lock must not take the tenant's row (every claim of
    # the tenant would wait on it).
    select(Tenant.status)
    .where(Tenant.id == Document.tenant_id)
    .scalar_subquery()
    .label("tenant_status"),
)


async def start_claimed(session: AsyncSession, row: Any, run_id: str) -> Claimed | None:
    """Make the document of ``row`` (``CLAIM_COLUMNS``, locked) ``processing`` under
    ``run_id``; None when it has nothing to do."""
    if (
        row.collection_status is not CollectionStatus.active
        or row.tenant_status is TenantStatus.deleting
        or row.status not in (DocumentStatus.queued, DocumentStatus.processing)
    ):
        return None
    now = utcnow()
    await session.execute(
        update(Document)
        .where(Document.id == row.id, Document.tenant_id == row.tenant_id)
        .values(
            status=DocumentStatus.processing,
            stage="extract",
            progress=0,
            run_id=run_id,
            attempts=row.attempts + 1,
            started_at=now,
            heartbeat_at=now,
        )
    )
    return Claimed(
        document_id=row.id,
        tenant_id=row.tenant_id,
        size_bytes=row.size_bytes or 0,
        attempts=row.attempts + 1,
        collection_id=row.collection_id,
        chunk_count=row.chunk_count or 0,
        blob_key=row.blob_key,
        content_type=row.content_type,
        metadata=dict(row.metadata_ or {}),
        title=row.title,
        started_at=now,
        filename=row.filename,
        queued_since=row.heartbeat_at,
        language=row.language,
    )
