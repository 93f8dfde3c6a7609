"""Request and response shapes for tenants, members, invitations and the audit log."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

from atrium.models import Role, TenantStatus

TenantName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class Tenant(BaseModel):
    """A tenant (an organisation that owns collections, documents and keys)."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: TenantStatus
    plan: str
    created_at: dt.datetime


class TenantWithRole(Tenant):
    """A tenant as seen by one of its members."""

    role: Role


class TenantCreate(BaseModel):
    """A new tenant; its creator becomes its owner."""

    name: TenantName


class TenantUpdate(BaseModel):
    """Changes to a tenant."""

    name: TenantName


class Member(BaseModel):
    """A member of a tenant."""

    user_id: uuid.UUID
    email: str
    name: str
    role: Role
    joined_at: dt.datetime


class AssignableRole(enum.StrEnum):
    """Roles that can be given directly; ownership moves through transfer-ownership."""

    admin = "admin"
    member = "member"
    viewer = "viewer"


class MemberUpdate(BaseModel):
    """A new role for a member."""

    role: AssignableRole = Field(
        description="admin, member or viewer (make someone owner with transfer-ownership)."
    )


class OwnershipTransfer(BaseModel):
    """Hand the tenant to another member; the current owner becomes an admin."""

    user_id: uuid.UUID


class InvitationCreate(BaseModel):
    """Invite someone by e-mail address."""

    email: EmailStr
    role: AssignableRole = AssignableRole.member

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


class InvitationStatus(enum.StrEnum):
    """Where an invitation stands."""

    pending = "pending"
    accepted = "accepted"
    expired = "expired"


class Invitation(BaseModel):
    """An invitation (its token is only ever in the mail)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    role: Role
    status: InvitationStatus
    invited_by_user_id: uuid.UUID | None
    expires_at: dt.datetime
    accepted_at: dt.datetime | None
    created_at: dt.datetime


class InvitationAccept(BaseModel):
    """Accept an invitation.

    Signed in: only ``token``. Without an account: also ``password`` (and a ``name``); the
    account is created for the invited address, already verified (the mail proved it).
    """

    token: str = Field(min_length=10, max_length=200)
    password: str | None = Field(None, max_length=256)
    name: str = Field("", max_length=200)


class InvitationAccepted(BaseModel):
    """The membership an invitation created."""

    tenant: TenantWithRole
    user_id: uuid.UUID


class AuditEvent(BaseModel):
    """One entry of the audit log."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str | None
    target_id: str | None
    ip: str | None
    user_agent: str | None
    data: dict[str, Any]
    created_at: dt.datetime
