"""Request and response bodies of the collection routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from atrium.collections.metadata import Metadata
from atrium.models.ingestion import CollectionStatus

CollectionName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    Field(description="Unique in the tenant (compared without regard to case)."),
]
Description = Annotated[str, Field(max_length=2000, description="Free text for people.")]


class CollectionCreate(BaseModel):
    """A new collection."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName
    description: Description = ""
    metadata: Metadata = Field(default_factory=dict)


class CollectionUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are. ``metadata`` replaces the whole object."""

    model_config = ConfigDict(extra="forbid")

    name: CollectionName | None = None
    description: Description | None = None
    metadata: Metadata | None = None


class Collection(BaseModel):
    """A collection with its totals."""

    id: uuid.UUID
    name: str
    description: str
    metadata: dict[str, Any]
    status: CollectionStatus = Field(
        ..., description="active, or deleting while its documents and chunks are being removed."
    )
    document_count: int = Field(..., description="Documents in the collection, in any state.")
    chunk_count: int = Field(..., description="Searchable chunks of its documents.")
    total_bytes: int = Field(..., description="Size of the uploaded files, in bytes.")
    created_at: dt.datetime
    updated_at: dt.datetime
