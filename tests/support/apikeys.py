"""Test helpers for API keys: issue keys straight into the database (committed)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from atrium.apikeys import service
from atrium.auth.permissions import Scope
from atrium.kit.db import unit_of_work
from atrium.models import ApiKey, Tenant, User, utcnow

ALL_SCOPES: list[str] = [s.value for s in Scope]


async def create_api_key(
    app: Any,
    tenant: Tenant,
    scopes: list[str] | None = None,
    *,
    creator: User | None = None,
    expires_at: dt.datetime | None = None,
    revoked: bool = False,
    name: str = "test key",
    rate_limit_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """A key of ``tenant`` (all scopes unless given) and its secret; ``revoked`` revokes it
    a second ago, ``expires_at`` may lie in the past."""
    async with unit_of_work(app.state.sessionmaker) as session:
        key, secret = await service.issue_key(
            session,
            app.state.settings,
            tenant.id,
            name=name,
            scopes=ALL_SCOPES if scopes is None else scopes,
            expires_at=expires_at,
            rate_limit_per_minute=rate_limit_per_minute,
            created_by_user_id=creator.id if creator else None,
        )
        if revoked:
            key.revoked_at = utcnow() - dt.timedelta(seconds=1)
    return key, secret


def key_header(secret: str) -> dict[str, str]:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {secret}"}
