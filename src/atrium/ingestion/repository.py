"""SQL of documents, always scoped to one tenant.

The worker's writes are *fenced*: each processing run stamps the row with its own ``run_id``
when it claims the document, and every later write of that run matches on it. A run that lost
the document (a re-delivered task claimed it again, or it is being deleted) changes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.models.base import utcnow
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus


@dataclass(frozen=True)
class Claimed:
    """What a processing run needs of the document it claimed (see ``claim``)."""

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


class DocumentRepository:
    """Documents of one tenant."""

    def __init__(self, session: AsyncSession, tenant_id: uuid.UUID) -> None:
        self.session = session
        self.tenant_id = tenant_id

    async def get(
        self, document_id: uuid.UUID, collection_id: uuid.UUID | None = None
    ) -> Document | None:
        """The document, if it belongs to the tenant (and to the collection, when given)."""
        query = select(Document).where(
            Document.id == document_id, Document.tenant_id == self.tenant_id
        )
        if collection_id is not None:
            query = query.where(Document.collection_id == collection_id)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def by_sha(self, collection_id: uuid.UUID, sha256: str) -> Document | None:
        """The live document of the collection with these bytes, if any."""
        query = select(Document).where(
            Document.tenant_id == self.tenant_id,
            Document.collection_id == collection_id,
            Document.sha256 == sha256,
        )
        return (await self.session.execute(query)).scalar_one_or_none()

    def list_query(
        self, collection_id: uuid.UUID, status: DocumentStatus | None = None
    ) -> Select[Any]:
        """The collection's documents, newest first, optionally of one status."""
        query = select(Document).where(
            Document.tenant_id == self.tenant_id, Document.collection_id == collection_id
        )
        if status is not None:
            query = query.where(Document.status == status)
        return query.order_by(Document.created_at.desc(), Document.id)

    async def ids_in_collection(self, collection_id: uuid.UUID) -> list[tuple[uuid.UUID, str]]:
        """``(id, blob_key)`` of every document of a collection."""
        rows = await self.session.execute(
            select(Document.id, Document.blob_key).where(
                Document.tenant_id == self.tenant_id, Document.collection_id == collection_id
            )
        )
        return [(row[0], row[1]) for row in rows]

    async def mark_collection_deleting(self, collection_id: uuid.UUID) -> None:
        """Put every document of a collection in ``deleting`` (their processing stops)."""
        await self.session.execute(
            update(Document)
            .where(Document.tenant_id == self.tenant_id, Document.collection_id == collection_id)
            .values(status=DocumentStatus.deleting, sha256=None, run_id=None, stage=None)
        )

    # The worker's fenced writes ------------------------------------------------------------

    def _mine(self, document_id: uuid.UUID, run_id: str) -> Any:
        return (
            Document.id == document_id,
            Document.tenant_id == self.tenant_id,
            Document.run_id == run_id,
            Document.status == DocumentStatus.processing,
        )

    async def claim(self, document_id: uuid.UUID, run_id: str) -> Claimed | None:
        """Start a processing run: the document becomes ``processing`` and owned by ``run_id``.

        Returns what the run needs of the document, or None when there is nothing to do (gone,
        being deleted, already ready or failed, or its collection is being deleted). Plain
        columns and one UPDATE, not an ORM object and its flush: this runs once per document.
        """
        row = (
            await self.session.execute(
                select(
                    Document.status,
                    Document.attempts,
                    Document.collection_id,
                    Document.chunk_count,
                    Document.blob_key,
                    Document.content_type,
                    Document.metadata_,
                    Document.title,
                    Document.heartbeat_at,
                    Collection.status,
                    Document.filename,
                )
                .join(Collection, Collection.id == Document.collection_id)
                .where(Document.id == document_id, Document.tenant_id == self.tenant_id)
                .with_for_update()
            )
        ).one_or_none()
        if row is None:
            return None
        status, attempts, collection_id, chunk_count, blob_key, content_type = row[:6]
        metadata, title, queued_since, collection_status, filename = row[6:]
        if collection_status is not CollectionStatus.active or status not in (
            DocumentStatus.queued,
            DocumentStatus.processing,
        ):
            return None
        now = utcnow()
        await self.session.execute(
            update(Document)
            .where(Document.id == document_id, Document.tenant_id == self.tenant_id)
            .values(
                status=DocumentStatus.processing,
                stage="extract",
                progress=0,
                run_id=run_id,
                attempts=attempts + 1,
                started_at=now,
                heartbeat_at=now,
            )
        )
        return Claimed(
            attempts=attempts + 1,
            collection_id=collection_id,
            chunk_count=chunk_count or 0,
            blob_key=blob_key,
            content_type=content_type,
            metadata=dict(metadata or {}),
            title=title,
            started_at=now,
            filename=filename,
            queued_since=queued_since,
        )

    async def progress(self, document_id: uuid.UUID, run_id: str, stage: str, percent: int) -> bool:
        """Record the run's stage and percent; False when the run no longer owns the document."""
        result = await self.session.execute(
            update(Document)
            .where(*self._mine(document_id, run_id))
            .values(stage=stage, progress=percent, heartbeat_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))

    async def owned(self, document_id: uuid.UUID, run_id: str) -> bool:
        """Whether the run still owns the document and its collection is not being deleted."""
        row = (
            await self.session.execute(
                select(Document.id)
                .join(Collection, Collection.id == Document.collection_id)
                .where(*self._mine(document_id, run_id))
                .where(Collection.status == CollectionStatus.active)
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
                Document.tenant_id == self.tenant_id,
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

    async def requeue(self, document_id: uuid.UUID, run_id: str | None, note: str | None) -> bool:
        """Put the document back in ``queued`` (a retry is coming), with a note why."""
        where: Any = (
            self._mine(document_id, run_id)
            if run_id is not None
            else (
                Document.id == document_id,
                Document.tenant_id == self.tenant_id,
                Document.status.in_([DocumentStatus.queued, DocumentStatus.processing]),
            )
        )
        result = await self.session.execute(
            update(Document)
            .where(*where)
            .values(
                status=DocumentStatus.queued,
                stage=None,
                progress=0,
                error=note,
                run_id=None,
                heartbeat_at=utcnow(),
            )
        )
        return bool(getattr(result, "rowcount", 0))


async def stuck_documents(
    session: AsyncSession, older_than: dt.datetime, limit: int = 500
) -> list[Document]:
    """Documents (any tenant) queued, processing or deleting without a sign of life since
    ``older_than``; for the sweeper only."""
    query = (
        select(Document)
        .where(
            Document.status.in_(
                [DocumentStatus.queued, DocumentStatus.processing, DocumentStatus.deleting]
            ),
            Document.heartbeat_at < older_than,
        )
        .order_by(Document.heartbeat_at)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def stuck_collections(
    session: AsyncSession, older_than: dt.datetime, limit: int = 100
) -> list[Collection]:
    """Collections (any tenant) being deleted since before ``older_than``; for the sweeper."""
    query = (
        select(Collection)
        .where(Collection.status == CollectionStatus.deleting, Collection.updated_at < older_than)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())
