"""Who calls ``/mcp``: an API key, checked exactly as the tenant routes check one.

The HTTP routes learn the tenant from their path (``/v1/tenants/{tenant_id}/...``) and hand it
to :func:`atrium.apikeys.service.authenticate_api_key`. ``/mcp`` has no tenant in its path: an
API key belongs to exactly one tenant, so the tenant is read from the key's own row first, then
the very same function runs (revoked, expired and rotated keys, suspended tenants, the cached
records), followed by the same per-key rate limit the routes count
(:func:`atrium.billing.service.enforce_tenant_rate_limit`). What a key may do (its scopes) is
checked by each tool, since one endpoint serves tools that need different permissions.
"""

from __future__ import annotations

import uuid

from fastapi import Request

from atrium.apikeys import repository
from atrium.apikeys.secrets import is_well_formed, key_digest
from atrium.apikeys.service import authenticate_api_key
from atrium.auth.dependencies import API_KEY_PREFIX, bearer_token
from atrium.auth.subject import AuthSubject
from atrium.billing.service import enforce_tenant_rate_limit
from atrium.config import Settings
from atrium.kit.db import unit_of_work
from atrium.kit.errors import NotFound, Unauthorized

#: Which tenant each key belongs to, by the key's HMAC (never the key itself). A key never
#: changes tenant, so an entry can never be wrong; revocation, expiry and the tenant's status
#: are checked by ``authenticate_api_key`` on every request, whatever this map says. Bounded:
#: emptied when full (a miss costs one indexed read).
_KEY_TENANTS: dict[str, uuid.UUID] = {}
_KEY_TENANTS_MAX = 100_000

NEEDS_API_KEY = (
    "The MCP endpoint needs an API key: send 'Authorization: Bearer atr_...' "
    "(create one with POST /v1/tenants/{tenant_id}/api-keys or in the console)"
)


def forget_key_tenants() -> None:
    """Forget the key-to-tenant map of this process (tests)."""
    _KEY_TENANTS.clear()


async def key_tenant(request: Request, token: str) -> uuid.UUID:
    """The tenant an ``atr_...`` key belongs to.

    Args:
        request: the request (``app.state`` gives settings and the account database).
        token: the bearer credential, starting with ``atr_``.

    Raises:
        Unauthorized: a malformed key, or one that does not exist.
    """
    if not is_well_formed(token):
        # The same words authenticate_api_key uses, and no lookup for a mistyped key.
        raise Unauthorized("Malformed API key: check that it was copied whole")
    settings: Settings = request.app.state.settings
    # One digest per secret of the key ring: keys issued under a previous secret still work.
    digests = [key_digest(secret, token) for secret in settings.secret_keys]
    tenant_id = _KEY_TENANTS.get(digests[0])
    if tenant_id is not None:
        return tenant_id
    async with unit_of_work(request.app.state.sessionmaker, write=False) as session:
        key = await repository.find_by_digests(session, digests)
        tenant_id = key.tenant_id if key is not None else None
    if tenant_id is None:
        raise Unauthorized("Invalid API key")
    if len(_KEY_TENANTS) >= _KEY_TENANTS_MAX:
        _KEY_TENANTS.clear()
    _KEY_TENANTS[digests[0]] = tenant_id
    return tenant_id


async def authenticate(request: Request) -> AuthSubject:
    """Resolve the caller of ``/mcp`` and count the request against its rate limit.

    Leaves the subject where ``require`` leaves it on the routes (``request.state.subject``,
    ``tenant_id`` and ``principal``, which the access log reads).

    Raises:
        Unauthorized: no credentials, an access token instead of an API key, or a malformed,
            unknown, revoked or expired key, or a key whose tenant no longer exists.
        Forbidden: the key's tenant is suspended.
        TooManyRequests: the key is over its per-minute limit (with ``Retry-After``).
    """
    token = bearer_token(request)
    if token is None:
        raise Unauthorized(NEEDS_API_KEY)
    if not token.startswith(API_KEY_PREFIX):
        # An access token names a person, who may belong to many tenants, and /mcp has no
        # tenant in its path to pick one: only a key says which tenant the tools act on.
        raise Unauthorized(NEEDS_API_KEY + "; access tokens are not accepted here")
    tenant_id = await key_tenant(request, token)
    try:
        subject = await authenticate_api_key(request, None, token, tenant_id)
    except NotFound:
        # The routes answer 404 for a tenant being deleted (their path names it); here the
        # key itself no longer leads anywhere.
        raise Unauthorized("This API key's tenant no longer exists") from None
    await enforce_tenant_rate_limit(request, subject)
    request.state.tenant_id = str(subject.tenant_id)
    request.state.principal = subject.principal
    request.state.subject = subject
    return subject
