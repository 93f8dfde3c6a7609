"""Collections and the documents in them (the chunks live in the vector database)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from atrium.models.base import Base, IDMixin, TimestampMixin, UTCDateTime


class CollectionStatus(enum.StrEnum):
    """Lifecycle of a collection."""

    active = "active"
    deleting = "deleting"


class DocumentStatus(enum.StrEnum):
    """Lifecycle of a document: ``queued`` → ``processing`` → ``ready`` or ``failed``."""

    queued = "queued"
    processing = "processing"
    ready = "ready"
    failed = "failed"
    deleting = "deleting"


class Collection(IDMixin, TimestampMixin, Base):
    """A named set of documents searched together.

    ``name_key`` (a hash of the case-folded name) carries the uniqueness of names in a tenant:
    it compares the same on MariaDB and SQLite whatever the collation, and is cleared when the
    collection starts being deleted, so the name can be used again at once.
    """

    __tablename__ = "collections"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name_key", name="uq_collections_tenant_id_name_key"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    name_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[CollectionStatus] = mapped_column(
        Enum(CollectionStatus, native_enum=False, length=20, validate_strings=True),
        default=CollectionStatus.active,
    )
    #: The PostgreSQL text search configuration of its chunks (``kit.vectordb.LANGUAGES``):
    #: how lexical and hybrid search stem and match its text. Fixed at creation.
    language: Mapped[str] = mapped_column(String(32), default="english", server_default="english")


class Document(IDMixin, TimestampMixin, Base):
    """One uploaded file or text, and where its processing stands.

    ``sha256`` makes the same bytes in the same collection one document; it is cleared when the
    document starts being deleted. ``run_id`` fences processing runs: a run writes only while
    the row still carries its id, so a superseded run (a redelivered task, a re-index) stops.
    """

    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "collection_id", "sha256", name="uq_documents_tenant_id_collection_sha"
        ),
        Index("ix_documents_tenant_collection_status", "tenant_id", "collection_id", "status"),
        Index("ix_documents_status_heartbeat", "status", "heartbeat_at"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE")
    )
    title: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str | None] = mapped_column(String(500), nullable=True)
    content_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    blob_key: Mapped[str] = mapped_column(String(600))
    status: Mapped[DocumentStatus] = mapped_column(
        Enum(DocumentStatus, native_enum=False, length=20, validate_strings=True),
        default=DocumentStatus.queued,
    )
    stage: Mapped[str | None] = mapped_column(String(20), nullable=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    token_count: Mapped[int] = mapped_column(BigInteger, default=0)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
