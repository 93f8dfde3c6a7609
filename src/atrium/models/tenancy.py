"""Users, tenants and the memberships that join them."""

from __future__ import annotations

import enum
import uuid

from fastapi_users_db_sqlalchemy import SQLAlchemyBaseUserTableUUID
from sqlalchemy import Enum, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from atrium.models.base import Base, IDMixin, TimestampMixin


class Role(enum.StrEnum):
    """A member's role in a tenant, from most to least powerful."""

    owner = "owner"
    admin = "admin"
    member = "member"
    viewer = "viewer"


class TenantStatus(enum.StrEnum):
    """Lifecycle of a tenant."""

    active = "active"
    suspended = "suspended"
    deleting = "deleting"


class User(SQLAlchemyBaseUserTableUUID, TimestampMixin, Base):
    """A person who signs in (fastapi-users owns the auth columns)."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(200), default="", server_default="")

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="user", lazy="raise", cascade="all, delete-orphan"
    )


class Tenant(IDMixin, TimestampMixin, Base):
    """A customer organisation; everything it owns carries its id."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[TenantStatus] = mapped_column(
        Enum(TenantStatus, native_enum=False, length=20, validate_strings=True),
        default=TenantStatus.active,
    )
    plan: Mapped[str] = mapped_column(String(50), default="free", server_default="free")

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="tenant", lazy="raise", cascade="all, delete-orphan"
    )


class Membership(TimestampMixin, Base):
    """A user's role in a tenant."""

    __tablename__ = "memberships"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[Role] = mapped_column(
        Enum(Role, native_enum=False, length=20, validate_strings=True)
    )

    tenant: Mapped[Tenant] = relationship(back_populates="memberships", lazy="raise")
    user: Mapped[User] = relationship(back_populates="memberships", lazy="raise")
