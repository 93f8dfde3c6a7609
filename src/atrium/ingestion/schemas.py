"""Request and response bodies of the document routes."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from atrium.collections.metadata import Metadata
from atrium.models.ingestion import DocumentStatus


class Stage(enum.StrEnum):
    """Where a document in ``processing`` is."""

    extract = "extract"
    chunk = "chunk"
    embed = "embed"
    store = "store"


class DocumentCreate(BaseModel):
    """A document sent as JSON text instead of a file."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[
        str | None,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=500),
        Field(description="Defaults to the first Markdown heading, else 'Untitled'."),
    ] = None
    text: Annotated[
        str,
        Field(
            min_length=1,
            description="The content: plain text, Markdown or HTML (recognised by content).",
        ),
    ]
    metadata: Metadata = Field(default_factory=dict)


class Document(BaseModel):
    """A document and where its processing stands."""

    id: uuid.UUID
    collection_id: uuid.UUID
    title: str
    filename: str | None = Field(None, description="The uploaded file's name, if it had one.")
    content_type: str = Field(..., description="The type found from the content.")
    size_bytes: int
    sha256: str | None = Field(None, description="SHA-256 of the uploaded bytes.")
    metadata: dict[str, Any]
    status: DocumentStatus = Field(
        ..., description="queued → processing → ready or failed; deleting while being removed."
    )
    stage: Stage | None = Field(None, description="While processing: the current stage.")
    progress: int = Field(..., ge=0, le=100, description="Percent done (100 when ready).")
    error: str | None = Field(
        None, description="Why it failed (or, while queued again, why it is being retried)."
    )
    chunk_count: int = Field(..., description="Chunks in the search index.")
    token_count: int = Field(..., description="Model tokens over all chunks.")
    timings: dict[str, float] = Field(
        default_factory=dict,
        description="Milliseconds per stage of the last run: queue, extract, chunk, embed, "
        "store, total.",
    )
    attempts: int = Field(..., description="Processing runs started since upload or re-index.")
    created_at: dt.datetime
    updated_at: dt.datetime
    processed_at: dt.datetime | None = Field(None, description="When it last became ready.")


class UploadedDocument(Document):
    """A document as an upload answers it."""

    duplicate: bool = Field(
        ..., description="True when the same bytes were already in the collection."
    )


class DocumentUpload(BaseModel):
    """The documents an upload created (or found already there), in the order sent."""

    documents: list[UploadedDocument]
