"""Documents: upload (validated, stored, queued), read, re-index and delete.

Uploads are checked before anything is stored: one bad file in a multipart request refuses the
whole request with a 4xx naming that file. The check is bounded (the type sniffed from the bytes,
text decoded piece by piece, a ZIP's directory read without inflating anything; see
``detect.inspect_upload``): parsing happens in the worker's sandbox, which fails a document it
cannot read with the reason. The raw bytes go to the blob store, the row is committed as
``queued``, and only then is the processing task sent (enqueue after commit).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from atrium.audit.service import record
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Metric
from atrium.collections.service import get_writable
from atrium.context import ServiceContext
from atrium.ingestion import detect, schemas
from atrium.ingestion.exceptions import BadDocument
from atrium.ingestion.limits import human_bytes, max_upload_bytes
from atrium.ingestion.repository import DocumentRepository
from atrium.kit.blobstore import BlobStore, tenant_prefix
from atrium.kit.cache_versions import catalog_changed
from atrium.kit.enqueue import enqueue
from atrium.kit.errors import (
    AtriumError,
    Conflict,
    NotFound,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
)
from atrium.models.base import utcnow
from atrium.models.ingestion import Document, DocumentStatus

PROCESS_TASK = "atrium.ingestion.process_document"
DELETE_TASK = "atrium.ingestion.delete_document"


@dataclass
class Incoming:
    """One document of an upload request, before validation.

    Attributes:
        label: how messages name it (``File 'a.pdf'`` or ``The text``).
        read: returns the bytes (may be called twice: to check, then to store).
        size: the size in bytes.
        declared_type: the Content-Type the client sent for it, if any.
        filename: the uploaded file's name, if any.
        title: a title the client gave (wins over the document's own).
        fallback_title: the title until the worker finds the document's own (JSON text: its
            first line); a file is named after its file name.
        metadata: validated metadata.
    """

    label: str
    read: Callable[[], Awaitable[bytes]]
    size: int
    declared_type: str | None = None
    filename: str | None = None
    title: str | None = None
    fallback_title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Checked:
    incoming: Incoming
    sha256: str
    content_type: str
    title: str
    size: int


def to_schema(document: Document) -> schemas.Document:
    """The response body of a document."""
    stage = document.stage if document.status is DocumentStatus.processing else None
    return schemas.Document(
        id=document.id,
        collection_id=document.collection_id,
        title=document.title,
        filename=document.filename,
        content_type=document.content_type,
        size_bytes=document.size_bytes,
        sha256=document.sha256,
        metadata=document.metadata_ or {},
        status=document.status,
        stage=schemas.Stage(stage) if stage else None,
        progress=document.progress,
        error=document.error,
        chunk_count=document.chunk_count,
        token_count=document.token_count,
        timings=document.timings or {},
        attempts=document.attempts,
        created_at=document.created_at,
        updated_at=document.updated_at,
        processed_at=document.processed_at,
    )


def rows_to_schemas(rows: Sequence[Any]) -> list[schemas.Document]:
    """Turn ``DocumentRepository.list_query`` rows into response bodies."""
    return [to_schema(row) for row in rows]


def blob_key(tenant_id: uuid.UUID, collection_id: uuid.UUID, document_id: uuid.UUID) -> str:
    """Where a document's raw bytes live; a collection's documents share one prefix."""
    return f"{collection_prefix(tenant_id, collection_id)}documents/{document_id}"


def collection_prefix(tenant_id: uuid.UUID, collection_id: uuid.UUID) -> str:
    """The blob prefix of everything in a collection."""
    return f"{tenant_prefix(tenant_id)}collections/{collection_id}/"


def _to_http(exc: BadDocument) -> AtriumError:
    if exc.status_code == 415:
        return UnsupportedMediaType(exc.message)
    if exc.status_code == 413:
        return PayloadTooLarge(exc.message)
    return Unprocessable(exc.message)


def _too_large(label: str, size: int, limit: int) -> PayloadTooLarge:
    shown, most = human_bytes(size), human_bytes(limit)
    if shown == most:  # rounding hides the difference ("4.9 KB; at most 4.9 KB"): exact bytes
        shown, most = f"{size:,} bytes", f"{limit:,} bytes"
    return PayloadTooLarge(
        f"{label} is {shown}; the largest upload allowed is {most}. "
        "Split it into smaller documents."
    )


async def _check(item: Incoming, limit: int) -> _Checked:
    if item.size > limit:
        raise _too_large(item.label, item.size, limit)
    data = await item.read()
    if len(data) > limit:
        raise _too_large(item.label, len(data), limit)
    try:
        # Bounded work (linear time, flat memory) but still CPU: off the event loop.
        content_type = await run_in_threadpool(
            detect.inspect_upload, data, item.declared_type, item.label
        )
    except BadDocument as exc:
        raise _to_http(exc) from None
    # The document's own title (PDF/DOCX properties, first heading...) is only known once the
    # worker has read it; it then replaces this placeholder (see ``stages.final_title``).
    title = item.title or item.filename or item.fallback_title or "Untitled"
    return _Checked(item, hashlib.sha256(data).hexdigest(), content_type, title[:500], len(data))


async def upload(
    ctx: ServiceContext,
    subject: AuthSubject,
    collection_id: uuid.UUID,
    items: Sequence[Incoming],
    *,
    blobs: BlobStore,
) -> list[tuple[Document, bool]]:
    """Validate, store and queue documents; the same bytes already in the collection are
    returned instead of stored twice.

    Returns:
        ``(document, duplicate)`` per item, in order.

    Raises:
        NotFound: no such collection in the tenant.
        Conflict: the collection is being deleted.
        PayloadTooLarge, UnsupportedMediaType, Unprocessable: a bad item (nothing is stored).
    """
    session = ctx.session
    collection = await get_writable(session, subject.tenant_id, collection_id)
    limit = await max_upload_bytes(session, subject.tenant_id, ctx.settings)
    checked = [await _check(item, limit) for item in items]

    repo = DocumentRepository(session, subject.tenant_id)
    # Bytes already in the collection come back as they are and need no quota.
    known: dict[str, Document] = {}
    for item in checked:
        if item.sha256 not in known:
            found = await repo.by_sha(collection.id, item.sha256)
            if found is not None:
                known[item.sha256] = found
    fresh = {item.sha256: item.size for item in checked if item.sha256 not in known}

    results: list[tuple[Document, bool]] = []
    created: dict[str, Document] = {}
    # Plan limits (billing): the request's new documents and their bytes are held at once
    # (402 when they do not fit), and what was really added is counted when it commits.
    async with (
        ctx.reserve(subject.tenant_id, Metric.documents, len(fresh)) as held_docs,
        ctx.reserve(subject.tenant_id, Metric.stored_bytes, sum(fresh.values())) as held_bytes,
    ):
        for item in checked:
            same = known.get(item.sha256) or created.get(item.sha256)
            if same is not None:
                results.append((same, True))
                continue
            document = _new_document(subject.tenant_id, collection.id, item)
            try:
                # A concurrent upload of the same bytes may win the unique key: return its row.
                async with session.begin_nested():
                    session.add(document)
                    await session.flush()
            except IntegrityError:
                winner = await repo.by_sha(collection.id, item.sha256)
                if winner is None:
                    raise
                known[item.sha256] = winner
                results.append((winner, True))
                continue
            await blobs.put(document.blob_key, await item.incoming.read())
            created[item.sha256] = document
            enqueue(
                session,
                PROCESS_TASK,
                tenant_id=str(subject.tenant_id),
                document_id=str(document.id),
            )
            _audit(ctx, subject, "document.uploaded", document)
            results.append((document, False))
        held_docs.settle(len(created))
        held_bytes.settle(sum(doc.size_bytes for doc in created.values()))
    return results


def _new_document(tenant_id: uuid.UUID, collection_id: uuid.UUID, item: _Checked) -> Document:
    document = Document(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        collection_id=collection_id,
        title=item.title,
        filename=(item.incoming.filename or None) and item.incoming.filename[:500],
        content_type=item.content_type,
        size_bytes=item.size,
        sha256=item.sha256,
        metadata_=item.incoming.metadata,
        status=DocumentStatus.queued,
        progress=0,
        chunk_count=0,
        token_count=0,
        timings={},
        attempts=0,
        heartbeat_at=utcnow(),
    )
    document.blob_key = blob_key(tenant_id, collection_id, document.id)
    return document


async def get(
    session: AsyncSession,
    subject: AuthSubject,
    collection_id: uuid.UUID | None,
    document_id: uuid.UUID,
) -> Document:
    """A document of the tenant, in the collection when one is given (None: in any of them).

    Another tenant's document is not found, exactly like one that never existed.

    Raises:
        NotFound: when the tenant has no such document (in that collection).
    """
    document = await DocumentRepository(session, subject.tenant_id).get(document_id, collection_id)
    if document is None:
        raise NotFound("Document not found")
    return document


async def reindex(
    ctx: ServiceContext, subject: AuthSubject, collection_id: uuid.UUID, document_id: uuid.UUID
) -> Document:
    """Process the document again from its stored bytes (e.g. after a failure or a settings
    change). Its current chunks stay searchable until the new ones replace them. A document
    already queued or processing is left as it is.

    Raises:
        NotFound: no such document.
        Conflict: the document or its collection is being deleted.
    """
    session = ctx.session
    await get_writable(session, subject.tenant_id, collection_id)
    document = await get(session, subject, collection_id, document_id)
    if document.status is DocumentStatus.deleting:
        raise Conflict("This document is being deleted")
    if document.status in (DocumentStatus.queued, DocumentStatus.processing):
        return document
    document.status = DocumentStatus.queued
    document.stage = None
    document.progress = 0
    document.error = None
    document.attempts = 0
    document.run_id = None
    document.heartbeat_at = utcnow()
    await session.flush()
    enqueue(session, PROCESS_TASK, tenant_id=str(subject.tenant_id), document_id=str(document.id))
    _audit(ctx, subject, "document.reindexed", document)
    return document


async def delete(
    ctx: ServiceContext, subject: AuthSubject, collection_id: uuid.UUID, document_id: uuid.UUID
) -> Document:
    """Mark a document as being deleted and enqueue the removal of its chunks and file.

    Its processing stops; the same bytes may be uploaded again at once. Deleting twice is
    harmless.

    Raises:
        NotFound: no such document.
    """
    session = ctx.session
    document = await get(session, subject, collection_id, document_id)
    if document.status is DocumentStatus.deleting:
        return document
    document.status = DocumentStatus.deleting
    document.sha256 = None
    document.stage = None
    document.run_id = None
    document.heartbeat_at = utcnow()
    await session.flush()
    # Searches leave it out from this commit on (see atrium.collections.catalog).
    catalog_changed(session, ctx.redis, subject.tenant_id)
    # Plan limits (billing): the document, its bytes and its chunks stop counting now.
    await ctx.adjust(subject.tenant_id, Metric.documents, -1)
    await ctx.adjust(subject.tenant_id, Metric.stored_bytes, -(document.size_bytes or 0))
    await ctx.adjust(subject.tenant_id, Metric.chunks, -(document.chunk_count or 0))
    enqueue(session, DELETE_TASK, tenant_id=str(subject.tenant_id), document_id=str(document.id))
    _audit(ctx, subject, "document.deleted", document)
    return document


def _audit(ctx: ServiceContext, subject: AuthSubject, action: str, document: Document) -> None:
    record(
        ctx.session,
        action,
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        actor_api_key_id=subject.api_key_id,
        target_type="document",
        target_id=document.id,
        data={"collection_id": str(document.collection_id), "title": document.title[:200]},
    )
