"""Who calls ``/mcp``: an API key, checked exactly as the tenant routes check one.

The HTTP routes learn the tenant from their path (``/v1/tenants/{tenant_id}/...``) and hand it
to :func:`atrium.auth.api_keys.authenticate_api_key`. ``/mcp`` has no tenant in its
path: an API key belongs to exactly one tenant, so the tenant is read from the key's own row
first (:func:`atrium.auth.api_keys.tenant_of_key`: remembered per app for a key that
exists, in Redis for one that does not, with one database read for all the requests that miss
it at once, as on the routes), then the very same function runs (revoked, expired and rotated keys,
suspended tenants, the cached records), followed by the same per-key
rate limit the routes count (:func:`atrium.billing.service.enforce_tenant_rate_limit`). What
a key may do (its scopes) is checked by each tool, since one endpoint serves tools that need
different permissions.
"""

from __future__ import annotations

from fastapi import Request

from atrium.auth.api_keys import authenticate_api_key, tenant_of_key
from atrium.auth.dependencies import API_KEY_PREFIX, bearer_token
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Quota
from atrium.billing.service import enforce_tenant_rate_limit
from atrium.kit.errors import NotFound, Unauthorized
from atrium.kit.ratelimit import request_states

NEEDS_API_KEY = (
    "The MCP endpoint needs an API key: send 'Authorization: Bearer atr_...' "
    "(create one with POST /v1/tenants/{tenant_id}/api-keys or in the console)"
)


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
    tenant_id = await tenant_of_key(request, token)
    try:
        subject = await authenticate_api_key(request, None, token, tenant_id)
    except NotFound:
        # The routes answer 404 for a tenant being deleted (their path names it); here the
        # key itself no longer leads anywhere.
        raise Unauthorized("This API key's tenant no longer exists") from None
    await enforce_tenant_rate_limit(Quota.of(request), subject, request_states(request))
    request.state.tenant_id = str(subject.tenant_id)
    request.state.principal = subject.principal
    request.state.subject = subject
    return subject
