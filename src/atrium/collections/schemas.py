"""Request and response bodies of the collection routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from atrium.collections.metadata import Metadata
from atrium.kit.vectordb import DEFAULT_LANGUAGE, LANGUAGES
from atrium.models.ingestion import CollectionStatus

CollectionName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    Field(description="Unique in the tenant (compared without regard to case)."),
]
Description = Annotated[str, Field(max_length=2000, description="Free text for people.")]


def _known_language(value: str) -> str:
    value = value.strip().lower()
    if value not in LANGUAGES:
        raise ValueError(
            f"unknown language {value!r}: use one of {', '.join(LANGUAGES)} "
            "('simple' lowercases without stemming, for codes, names or other languages)"
        )
    return value


Language = Annotated[
    str,
    AfterValidator(_known_language),
    Field(
        description=(
            "The language its documents are stemmed and matched in by lexical and hybrid search: "
            "a PostgreSQL text search configuration (english, german, french, ..., or simple). "
            "Fixed at creation."
        ),
        examples=["english"],
    ),
]


class CollectionCreate(BaseModel):
    """A new collection."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName
    description: Description = ""
    metadata: Metadata = Field(default_factory=dict)
    language: Language = DEFAULT_LANGUAGE


class CollectionUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are. ``metadata`` replaces the whole object."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName | None = None
    description: Description | None = None
    metadata: Metadata | None = None
    language: Language | None = Field(
        None, description="Accepted only when unchanged: a collection's language is fixed."
    )


class Collection(BaseModel):
    """A collection with its totals."""

    id: uuid.UUID
    name: str
    description: str
    metadata: dict[str, Any]
    language: str = Field(..., description="Its full-text language (text search configuration).")
    status: CollectionStatus = Field(
        ..., description="active, or deleting while its documents and chunks are being removed."
    )
    document_count: int = Field(..., description="Documents in the collection, in any state.")
    chunk_count: int = Field(..., description="Searchable chunks of its documents.")
    total_bytes: int = Field(..., description="Size of the uploaded files, in bytes.")
    created_at: dt.datetime
    updated_at: dt.datetime
