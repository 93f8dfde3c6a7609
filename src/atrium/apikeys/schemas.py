"""Request and response bodies of the API key routes."""

from __future__ import annotations

import datetime as dt
import enum
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atrium.auth.permissions import Scope

#: The longest grace period a rotation may give the old key (7 days).
MAX_GRACE_PERIOD_SECONDS = 7 * 24 * 3600


class ApiKeyStatus(enum.StrEnum):
    """Whether a key works now."""

    active = "active"
    rotating = "rotating"  # replaced; the old secret works until its grace period ends
    expired = "expired"
    revoked = "revoked"


class ApiKeyCreate(BaseModel):
    """A new key: what it may do and for how long."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, description="A label people recognise.")
    scopes: list[Scope] = Field(
        min_length=1,
        description="What the key may do: " + ", ".join(s.value for s in Scope) + ".",
    )
    expires_at: dt.datetime | None = Field(
        None, description="When the key stops working (ISO 8601 with a time zone). Never if null."
    )
    rate_limit_per_minute: int | None = Field(
        None, ge=1, le=1_000_000, description="Requests per minute for this key; null: the plan's."
    )

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("name must not be blank")
        return value

    @field_validator("scopes")
    @classmethod
    def _unique_scopes(cls, value: list[Scope]) -> list[Scope]:
        return sorted(set(value), key=lambda s: list(Scope).index(s))

    @field_validator("expires_at")
    @classmethod
    def _future_aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("expires_at needs a time zone, e.g. 2030-01-01T00:00:00Z")
        if value <= dt.datetime.now(dt.UTC):
            raise ValueError("expires_at must be in the future")
        return value.astimezone(dt.UTC)


class ApiKeyRotate(BaseModel):
    """How long the old secret keeps working after rotation."""

    model_config = ConfigDict(extra="forbid")

    grace_period_seconds: int = Field(
        0,
        ge=0,
        le=MAX_GRACE_PERIOD_SECONDS,
        description="Seconds the old key keeps working (0: refused at once; at most 7 days).",
    )


class ApiKey(BaseModel):
    """A key as listed: never its secret."""

    id: uuid.UUID
    name: str
    prefix: str = Field(description="The first characters of the key, e.g. atr_1a2B3c4D.")
    last_four: str = Field(description="The last four characters of the key.")
    scopes: list[str]
    status: ApiKeyStatus
    created_by_user_id: uuid.UUID | None
    created_by_api_key_id: uuid.UUID | None
    rotated_from_id: uuid.UUID | None
    rate_limit_per_minute: int | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None = Field(
        description="When the key was (or, during a rotation's grace period, will be) revoked."
    )
    last_used_at: dt.datetime | None = Field(
        description="Last use, to the minute (updated at most once a minute)."
    )


class ApiKeyCreated(ApiKey):
    """A new key with its secret: shown this once, store it now."""

    key: str = Field(description="The secret. Atrium keeps only a hash: it cannot show it again.")
