"""Request dependencies that resolve the caller: a user (access token) or an API key.

Tenant routes declare the one permission they need with ``Depends(require(Permission.x))``; the
dependency resolves the :class:`AuthSubject` for the tenant in the path. Another tenant's
resources answer 404 (we never confirm they exist); a missing permission answers 403 naming it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from atrium.auth import tokens
from atrium.auth.api_keys import authenticate_api_key
from atrium.auth.permissions import Permission, permissions_for_role
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Quota
from atrium.billing.service import enforce_tenant_rate_limit
from atrium.kit.db import DBSession
from atrium.kit.errors import Forbidden, NotFound, Unauthorized
from atrium.kit.ratelimit import request_states
from atrium.models import User
from atrium.tenants.repository import MembershipRepository
from atrium.tenants.status import ensure_tenant_usable

API_KEY_PREFIX = "atr_"


def bearer_token(request: Request) -> str | None:
    """The credential of an ``Authorization: Bearer ...`` header, if any.

    Raises:
        Unauthorized: more than one ``Authorization`` header (a proxy in front may have
            checked another one than the one we would read), or one that is not a bearer
            credential.
    """
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:
        raise Unauthorized(
            f"Send one Authorization header: this request has {len(headers)}, "
            "and which one counts would be ambiguous"
        )
    header = headers[0] if headers else None
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization header must be 'Bearer <access token or API key>'")
    return value.strip()


@dataclass(frozen=True)
class UserPrincipal:
    """A person authenticated by an access token."""

    user: User
    claims: tokens.AccessClaims


async def _authenticate_user(request: Request, session: DBSession, token: str) -> UserPrincipal:
    claims = await tokens.decode_access_token(token)
    await tokens.ensure_not_revoked(request.app.state.redis, claims)
    user = await session.get(User, claims.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("This account is disabled or no longer exists")
    request.state.principal = f"user:{user.id}"
    principal = UserPrincipal(user=user, claims=claims)
    request.state.user_principal = principal
    return principal


async def current_user(request: Request, session: DBSession) -> UserPrincipal:
    """The person calling (access token only; API keys cannot manage accounts)."""
    cached: UserPrincipal | None = getattr(request.state, "user_principal", None)
    if cached is not None:
        return cached
    token = bearer_token(request)
    if token is None:
        raise Unauthorized()
    if token.startswith(API_KEY_PREFIX):
        raise Forbidden("This route needs a user's access token; API keys cannot call it")
    return await _authenticate_user(request, session, token)


CurrentUser = Annotated[UserPrincipal, Depends(current_user)]


async def current_superuser(principal: CurrentUser) -> UserPrincipal:
    """A superuser; anyone else gets 403."""
    if not principal.user.is_superuser:
        raise Forbidden("This route is for superusers")
    return principal


SuperUser = Annotated[UserPrincipal, Depends(current_superuser)]


class require:
    """Dependency factory: the caller must hold ``permission`` in the path's tenant.

    Every request is counted against the caller's per-minute rate limit here, except with
    ``rate_limit_in_hold``: a metered route (search, answer) counts it in the same Redis
    script as its quota hold (:func:`atrium.retrieval.endpoints.query_context`), so the
    request meets quota once.
    """

    def __init__(self, permission: Permission, *, rate_limit_in_hold: bool = False) -> None:
        self.permission = permission
        self.rate_limit_in_hold = rate_limit_in_hold

    def __repr__(self) -> str:
        held = ", rate_limit_in_hold=True" if self.rate_limit_in_hold else ""
        return f"require({self.permission.value!r}{held})"

    async def __call__(self, request: Request, tenant_id: uuid.UUID) -> AuthSubject:
        # No DBSession parameter on purpose: a cached API key needs no database at all, and
        # building the request's unit of work for nothing (session, commit, teardown) was a
        # visible share of a trivial route's cost in bench/auth.py. People are resolved in a
        # short read-only session of their own.
        token = bearer_token(request)
        if token is None:
            raise Unauthorized()
        if token.startswith(API_KEY_PREFIX):
            subject = await authenticate_api_key(request, None, token, tenant_id)
        else:
            async with request.app.state.sessionmaker() as session:
                principal = await _authenticate_user(request, session, token)
                subject = await _member_subject(session, principal, tenant_id)
        allowed = subject.can(self.permission)
        if not (self.rate_limit_in_hold and allowed):
            # Per API key / per user, with the plan's numbers (429 with Retry-After when over).
            # A refused attempt counts too, also on a route that leaves the count to its hold.
            await enforce_tenant_rate_limit(Quota.of(request), subject, request_states(request))
        if not allowed:
            raise Forbidden(
                f"Missing permission '{self.permission.value}'",
                detail={
                    "message": f"Missing permission '{self.permission.value}'",
                    "missing_permission": self.permission.value,
                },
            )
        request.state.tenant_id = str(tenant_id)
        request.state.principal = subject.principal
        request.state.subject = subject
        return subject


async def _member_subject(
    session: DBSession, principal: UserPrincipal, tenant_id: uuid.UUID
) -> AuthSubject:
    found = await MembershipRepository(session, tenant_id).role_and_status(principal.user.id)
    if found is None:
        raise NotFound("Tenant not found")
    role, status = found
    ensure_tenant_usable(status)
    return AuthSubject(
        kind="user",
        tenant_id=tenant_id,
        user_id=principal.user.id,
        role=role,
        permissions=permissions_for_role(role),
    )


def TenantSubject(permission: Permission) -> type[AuthSubject]:
    """``Annotated`` alias: ``subject: TenantSubject(Permission.search)``."""
    return Annotated[AuthSubject, Depends(require(permission))]  # type: ignore[return-value]
