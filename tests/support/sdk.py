"""Helpers of the SDK tests: a user, a tenant and an API key made through the SDK itself."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from atrium_client import Atrium

from atrium.auth import tokens
from tests.support import services
from tests.support.apikeys import ALL_SCOPES
from tests.support.factories import create_user


@dataclass
class Account:
    """A user's access token, the tenant it created and an all-scopes API key of it."""

    url: str
    access_token: str
    tenant_id: str
    key_id: str
    key: str

    def client(self, **kw: Any) -> Atrium:
        """A sync client with the API key."""
        return Atrium(self.url, api_key=self.key, tenant_id=self.tenant_id, **kw)


async def _token(app: Any, *, superuser: bool = False) -> str:
    user = await create_user(app, superuser=superuser)
    return await tokens.create_access_token(user.id, uuid.uuid4().hex)


async def new_account(app: Any, url: str) -> Account:
    """A user inserted in the database; the rest through the SDK with the user's token.

    The tenant's per-key and per-user rate limits are lifted (a superuser's plan override): the
    tests send more than the free plan's 60 requests a minute with one key.
    """
    token = await _token(app)
    with Atrium(url, access_token=token) as account:
        tenant = account.tenants.create(f"SDK {uuid.uuid4().hex[:6]}")
        account.tenant_id = tenant.id
        key = account.api_keys.create("sdk tests", ALL_SCOPES)
    unlimited = {"requests_per_minute_per_key": 100_000, "requests_per_minute_per_user": 100_000}
    with Atrium(url, access_token=await _token(app, superuser=True)) as admin:
        admin.request(
            "PUT",
            f"/v1/admin/tenants/{tenant.id}/plan",
            json={"plan": "free", "overrides": unlimited},
        )
    return Account(url, token, str(tenant.id), str(key.id), key.key)


def clean_state(test_env: dict[str, Any]) -> None:
    """What the ``clean_state`` fixture does after a test, for the module-scoped fixtures."""
    services.reset_state(test_env["mysql_db"], test_env["redis_db"])


def uploaded_document(**fields: Any) -> dict[str, Any]:
    """An upload's answer for one document, as the server would send it (``fields`` override),
    for tests whose transport or stand-in server answers instead of Atrium."""
    now = "2026-01-01T00:00:00Z"
    document: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "collection_id": str(uuid.uuid4()),
        "title": "document",
        "filename": "document",
        "content_type": "text/plain",
        "status": "queued",
        "progress": 0,
        "attempts": 0,
        "chunk_count": 0,
        "token_count": 0,
        "size_bytes": 0,
        "metadata": {},
        "duplicate": False,
        "created_at": now,
        "updated_at": now,
    }
    return {"documents": [{**document, **fields}]}
