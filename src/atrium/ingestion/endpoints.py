"""Routes: upload, list, read, re-index and delete the documents of a collection."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.collections.metadata import parse_metadata_json
from atrium.collections.service import get as get_collection
from atrium.context import Ctx
from atrium.ingestion import service
from atrium.ingestion.detect import SUPPORTED, fallback_title
from atrium.ingestion.limits import (
    MAX_FILES_PER_REQUEST,
    max_request_bytes,
    max_upload_bytes,
    upload_too_large_message,
)
from atrium.ingestion.repository import DocumentRepository
from atrium.ingestion.schemas import Document, DocumentCreate, DocumentUpload, UploadedDocument
from atrium.kit.blobstore import get_blobstore
from atrium.kit.bodylimit import restrict as restrict_body
from atrium.kit.db import DBSession
from atrium.kit.errors import (
    Unprocessable,
    UnsupportedMediaType,
)
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.responses import TENANT, errors
from atrium.models.ingestion import DocumentStatus

router = APIRouter(
    prefix="/tenants/{tenant_id}/collections/{collection_id}/documents",
    tags=["documents"],
    responses=TENANT,
)


_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": f"One to {MAX_FILES_PER_REQUEST} files: {SUPPORTED}, "
                        "recognised by content (not by name).",
                    },
                    "metadata": {
                        "type": "string",
                        "description": "A JSON object applied to every file, e.g. "
                        '{"source": "handbook"}.',
                    },
                    "title": {
                        "type": "string",
                        "description": "A title, when exactly one file is sent.",
                    },
                },
            }
        },
        "application/json": {"schema": DocumentCreate.model_json_schema()},
    },
}


def _uploaded(document: Any, duplicate: bool) -> UploadedDocument:
    return UploadedDocument(**service.to_schema(document).model_dump(), duplicate=duplicate)


def _file_reader(upload: UploadFile) -> Any:
    async def read() -> bytes:
        await upload.seek(0)
        return await upload.read()

    return read


def _items_from_form(form: FormData) -> list[service.Incoming]:
    uploads = [
        value
        for key in ("files", "file")
        for value in form.getlist(key)
        if isinstance(value, UploadFile)
    ]
    if not uploads:
        raise Unprocessable(
            "Send one or more files in the multipart field 'files' "
            '(or JSON {"title", "text", "metadata"})'
        )
    raw_metadata = form.get("metadata")
    try:
        metadata = parse_metadata_json(raw_metadata if isinstance(raw_metadata, str) else None)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    raw_title = form.get("title")
    title = raw_title.strip()[:500] if isinstance(raw_title, str) and raw_title.strip() else None
    if title is not None and len(uploads) > 1:
        raise Unprocessable("'title' can only be given when a single file is uploaded")
    items = []
    for index, upload in enumerate(uploads):
        name = (upload.filename or "").strip() or None
        label = f"File '{name}'" if name else f"File #{index + 1}"
        items.append(
            service.Incoming(
                label=label,
                read=_file_reader(upload),
                size=upload.size or 0,
                declared_type=upload.content_type,
                filename=name,
                title=title,
                metadata=metadata,
            )
        )
    return items


def _item_from_json(body: bytes) -> service.Incoming:
    try:
        data = DocumentCreate.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in exc.errors()]
        ) from None
    encoded = data.text.encode("utf-8")

    async def read() -> bytes:
        return encoded

    return service.Incoming(
        label="The text",
        read=read,
        size=len(encoded),
        title=data.title,
        fallback_title=fallback_title(encoded),
        metadata=data.metadata,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DocumentUpload,
    summary="Upload documents",
    responses={
        200: {"model": DocumentUpload, "description": "Every document was already there."},
        **errors(402, 409, 413, 415),
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_documents(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    request: Request,
    response: Response,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.documents_write)),
) -> DocumentUpload:
    """Add documents to a collection: a multipart upload of one or more files, or JSON text.

    Each document is checked now (size, type from its content, text that decodes) and read
    in the background: `queued` → `processing` → `ready` or `failed`. Answers 202 with each
    document's id and status. Bytes already in the collection are not stored twice: that
    document comes back with `duplicate: true` (200 when every document was a duplicate).
    Without a `title`, a document is named after its file (JSON text: its first line) until it
    is read; then its own title (PDF or DOCX properties, HTML title, first heading) replaces it.

    Errors name the file: 413 larger than the upload limit, 415 an unsupported type or a
    Content-Type that contradicts the content, 422 empty, not UTF-8, a damaged ZIP/DOCX, or
    metadata that is not a small flat JSON object; 409 when the collection is being deleted.
    One bad file refuses the whole request. A file that cannot be read (an encrypted or
    scanned PDF, a damaged PDF, a ZIP bomb, a page without text) ends `failed` with the reason.
    """
    session, settings = ctx.session, ctx.settings
    limit = await max_upload_bytes(session, subject.tenant_id, settings)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    await get_collection(session, subject, collection_id)
    multipart = content_type == "multipart/form-data"
    # End the read transaction before the body, which may be slow to arrive: on SQLite it holds
    # this process's writer turn and the database's write lock, which nobody may keep waiting
    # for a client's upload speed (decision 0008). The writes below start a new one.
    await session.rollback()
    # The tenant's own limit on the bytes actually streamed (chunked bodies too), before any
    # is read: the app-wide middleware only knows the largest plan's.
    restrict_body(
        request,
        max_request_bytes(limit, multipart=multipart),
        upload_too_large_message(limit, multipart=multipart),
    )
    if multipart:
        form = await request.form(max_files=MAX_FILES_PER_REQUEST, max_fields=20)
        try:
            items = _items_from_form(form)
            results = await service.upload(
                ctx, subject, collection_id, items, blobs=get_blobstore(settings)
            )
        finally:
            await form.close()
    elif content_type == "application/json" or content_type.endswith("+json"):
        item = _item_from_json(await request.body())
        results = await service.upload(
            ctx, subject, collection_id, [item], blobs=get_blobstore(settings)
        )
    else:
        raise UnsupportedMediaType(
            "Send files as multipart/form-data (field 'files'), or JSON "
            '{"title", "text", "metadata"} as application/json'
        )
    if all(duplicate for _, duplicate in results):
        response.status_code = status.HTTP_200_OK
    return DocumentUpload(documents=[_uploaded(doc, dup) for doc, dup in results])


@router.get(
    "",
    response_model=Page[Document],
    summary="List documents",
)
async def list_documents(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    session: DBSession,
    params: Annotated[Params, Depends()],
    status_filter: Annotated[
        DocumentStatus | None, Query(alias="status", description="Only documents in this state.")
    ] = None,
    subject: AuthSubject = Depends(require(Permission.documents_read)),
) -> Any:
    """The collection's documents, newest first, with their processing state."""
    await get_collection(session, subject, collection_id)
    query = DocumentRepository(session, subject.tenant_id).list_query(collection_id, status_filter)
    return await paginate_query(session, query, params, service.rows_to_schemas)


@router.get(
    "/{document_id}",
    response_model=Document,
    summary="Get a document",
)
async def get_document(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    document_id: uuid.UUID,
    session: DBSession,
    subject: AuthSubject = Depends(require(Permission.documents_read)),
) -> Document:
    """A document and its state: `queued`, `processing` (with `stage` and `progress`),
    `ready` (chunks, tokens, timings per stage), `failed` (with the reason in `error`), or
    `deleting`."""
    return service.to_schema(await service.get(session, subject, collection_id, document_id))


@router.post(
    "/{document_id}/reindex",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Document,
    summary="Re-index a document",
    responses=errors(409),
)
async def reindex_document(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    document_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.documents_write)),
) -> Document:
    """Process the document again from its stored file. Its chunks stay searchable until the
    new ones replace them (in one transaction). A queued or processing document is left as is."""
    document = await service.reindex(ctx, subject, collection_id, document_id)
    return service.to_schema(document)


@router.delete(
    "/{document_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Document,
    summary="Delete a document",
)
async def delete_document(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    document_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.documents_write)),
) -> Document:
    """Delete a document: its chunks leave the search index and its file the blob store.

    Answers 202 with status `deleting`; the removal runs in the background (seconds), after
    which the document answers 404. The same file can be uploaded again at once.
    """
    document = await service.delete(ctx, subject, collection_id, document_id)
    return service.to_schema(document)
