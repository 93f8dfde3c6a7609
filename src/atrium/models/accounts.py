"""Account lifecycle: login sessions (refresh-token families), invitations and data exports."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import cast

from sqlalchemy import Enum, ForeignKey, Index, Integer, String
from sqlalchemy.orm import InstrumentedAttribute, Mapped, mapped_column

from atrium.models.base import Base, IDMixin, TimestampMixin, UTCDateTime, utcnow
from atrium.models.tenancy import Role, User

#: fastapi-users declares ``User.id`` and ``User.email`` as plain attributes for type checkers;
#: these are the same columns, typed for use in SQL expressions.
user_id_col = cast("InstrumentedAttribute[uuid.UUID]", User.id)
user_email_col = cast("InstrumentedAttribute[str]", User.email)


class AuthSession(IDMixin, Base):
    """One login: the refresh-token family of a device.

    ``refresh_jti`` is the id of the only refresh token of the family that may still be used;
    presenting any older one means it was stolen or replayed, and the whole session is revoked.
    The session id is the ``sid`` claim of every access and refresh token issued for it.
    """

    __tablename__ = "auth_sessions"
    __table_args__ = (Index("ix_auth_sessions_user_revoked", "user_id", "revoked_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    refresh_jti: Mapped[str] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(300), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Invitation(IDMixin, TimestampMixin, Base):
    """An invitation to join a tenant, bound to one address; only a hash of its token is kept."""

    __tablename__ = "invitations"
    __table_args__ = (Index("ix_invitations_tenant_email", "tenant_id", "email"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[Role] = mapped_column(
        Enum(Role, native_enum=False, length=20, validate_strings=True)
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    invited_by_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    accepted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    accepted_by_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )


class ExportStatus(enum.StrEnum):
    """Where a data export stands."""

    pending = "pending"
    ready = "ready"
    failed = "failed"


class DataExport(IDMixin, TimestampMixin, Base):
    """A user's request for a copy of their data; the ZIP lives in the blob store."""

    __tablename__ = "data_exports"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[ExportStatus] = mapped_column(
        Enum(ExportStatus, native_enum=False, length=20, validate_strings=True),
        default=ExportStatus.pending,
    )
    blob_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
