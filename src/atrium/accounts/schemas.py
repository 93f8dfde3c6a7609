"""Request and response shapes of the account routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

from fastapi_users import schemas as fu_schemas
from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, field_validator

from atrium.models import ExportStatus
from atrium.tenants.schemas import TenantWithRole

Name = Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)]


def _lower(value: str) -> str:
    return value.strip().lower()


class User(BaseModel):
    """A person's account."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    name: str
    is_verified: bool
    is_superuser: bool
    created_at: dt.datetime


class NewUser(fu_schemas.BaseUserCreate):
    """What fastapi-users' manager stores for a new user."""

    name: str = ""


class UserCreate(BaseModel):
    """Sign up. Without an invitation, a tenant owned by the new user is created too.

    With ``invitation_token`` (from an invitation mail) the new user joins that tenant instead;
    the e-mail must be the invited address, and the account counts as verified.
    """

    email: EmailStr
    password: str = Field(max_length=256)
    name: Name = ""
    tenant_name: Annotated[
        str | None, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
    ] = Field(None, description="Name of the tenant to create (default: '<name>'s workspace').")
    invitation_token: str | None = Field(None, max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return _lower(value)


class Registered(BaseModel):
    """The new account and the tenant it owns or joined."""

    user: User
    tenant: TenantWithRole


class EmailBody(BaseModel):
    """An e-mail address."""

    email: EmailStr

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return _lower(value)


class TokenBody(BaseModel):
    """A token from a mail."""

    token: str = Field(min_length=1, max_length=2000)


class ResetPassword(BaseModel):
    """A reset token from the mail and the new password."""

    token: str = Field(min_length=1, max_length=2000)
    password: str = Field(max_length=256)


class Accepted(BaseModel):
    """The request was taken; what happens next arrives by mail."""

    detail: str


class TokenPair(BaseModel):
    """An access token (short-lived) and the refresh token that renews it (single use)."""

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, no secret
    expires_in: int = Field(description="Seconds until the access token expires.")


class RefreshBody(BaseModel):
    """The current refresh token."""

    refresh_token: str = Field(min_length=1, max_length=4000)


class UserUpdate(BaseModel):
    """Changes to the caller's profile."""

    name: Name


class PasswordChange(BaseModel):
    """Change the password; other sessions end."""

    current_password: str = Field(max_length=256)
    new_password: str = Field(max_length=256)


class EmailChange(BaseModel):
    """Move the account to another address (effective once the new address is verified)."""

    new_email: EmailStr
    password: str = Field(max_length=256)

    @field_validator("new_email")
    @classmethod
    def _email(cls, value: str) -> str:
        return _lower(value)


class PasswordBody(BaseModel):
    """The account's password, to confirm a destructive action."""

    password: str = Field(max_length=256)


class Session(BaseModel):
    """A signed-in device."""

    id: uuid.UUID
    device: str | None = Field(description="The user agent that logged in.")
    ip: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime
    current: bool = Field(description="Whether this is the session making the request.")


class Export(BaseModel):
    """A data export and, once ready, a signed link to download it."""

    id: uuid.UUID
    status: ExportStatus
    created_at: dt.datetime
    completed_at: dt.datetime | None
    size_bytes: int | None
    error: str | None
    download_url: str | None = None
    download_expires_at: dt.datetime | None = None
