"""Account routes: ``/auth/*`` (sign-up, login, tokens, verification, reset) and ``/users/me*``."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm

from atrium.accounts import addresses, credentials, exports, registration, service, sessions
from atrium.accounts.manager import UserManager, get_user_manager
from atrium.accounts.schemas import (
    Accepted,
    EmailBody,
    EmailChange,
    Export,
    PasswordBody,
    PasswordChange,
    RefreshBody,
    Registered,
    ResetPassword,
    Session,
    TokenBody,
    TokenPair,
    User,
    UserCreate,
    UserUpdate,
)
from atrium.audit.service import Origin, record
from atrium.auth import tokens
from atrium.auth.user_limits import LimitedUser, user_rate_limit
from atrium.context import Ctx
from atrium.kit.blobstore import get_blobstore
from atrium.kit.db import DBSession
from atrium.kit.errors import (
    Gone,
    NotFound,
)
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.ratelimit import rate_limit
from atrium.kit.ratelimit_identifiers import by_field, by_ip
from atrium.kit.responses import SIGNED_IN, errors
from atrium.models import AuthSession, DataExport, ExportStatus

router = APIRouter()
Manager = Annotated[UserManager, Depends(get_user_manager)]

_ACCEPTED = "If an account matches, a mail is on its way."


async def _by_token_email(request: Request) -> str | None:
    """Identify a verification by the address its token names (read without verifying)."""
    try:
        body = await request.json()
    except ValueError:
        return None
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str):
        return None
    _, email = addresses.token_audience(token)
    if not email:
        return None
    return "email:" + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


# Per IP and per e-mail address; a bucket of the same name is shared by the routes that use it.
LOGIN_LIMITS = [
    Depends(rate_limit("login", 20, 60, key=by_ip)),
    Depends(rate_limit("login-email", 10, 300, key=by_field("username"))),
]
REGISTER_LIMITS = [
    Depends(rate_limit("register", 20, 3600, key=by_ip)),
    Depends(rate_limit("register-email", 5, 3600, key=by_field("email"))),
]
FORGOT_LIMITS = [
    Depends(rate_limit("forgot-password", 20, 3600, key=by_ip)),
    Depends(rate_limit("forgot-password-email", 5, 3600, key=by_field("email"))),
]
REQUEST_VERIFY_LIMITS = [
    Depends(rate_limit("verify", 30, 3600, key=by_ip)),
    Depends(rate_limit("verify-email", 5, 3600, key=by_field("email"))),
]
VERIFY_LIMITS = [
    Depends(rate_limit("verify", 30, 3600, key=by_ip)),
    Depends(rate_limit("verify-email", 5, 3600, key=_by_token_email)),
]
# Per signed-in user (besides the general limit of every account route, see LimitedUser):
# routes that check the password (a stolen access token must not become a password oracle)
# share one bucket; exports build a ZIP of everything the user can see.
PASSWORD_CHECK_LIMITS = [Depends(user_rate_limit("account-password", 10, 3600))]
EXPORT_LIMITS = [Depends(user_rate_limit("export", 5, 3600))]


def _pair(pair: sessions.TokenPair) -> TokenPair:
    return TokenPair(
        access_token=pair.access_token, refresh_token=pair.refresh_token, expires_in=pair.expires_in
    )


# Sign-up, verification, login ------------------------------------------------------------


@router.post(
    "/auth/register",
    tags=["auth"],
    dependencies=REGISTER_LIMITS,
    status_code=status.HTTP_201_CREATED,
    response_model=Registered,
    responses=errors(402, 403, 404, 409, 410, 429),
)
async def register(body: UserCreate, ctx: Ctx, manager: Manager) -> Registered:
    """Create an account.

    Without ``invitation_token`` a tenant owned by the new user is created and a verification
    mail is sent (login needs a verified address). With an invitation token from an invitation
    mail, the account joins that tenant instead and is verified at once.

    An address that already has an account gets the same answer (201, same shape, ids that
    lead nowhere) and its owner a mail saying someone tried to sign up with it: sign-up does
    not reveal which addresses are registered.
    """
    user, tenant = await registration.register(ctx, manager, body)
    return Registered(user=User.model_validate(user), tenant=tenant)


@router.post(
    "/auth/request-verify-token",
    tags=["auth"],
    dependencies=REQUEST_VERIFY_LIMITS,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=errors(429),
)
async def request_verify_token(body: EmailBody, session: DBSession, manager: Manager) -> Accepted:
    """Mail a new verification link. The answer is the same whether or not the address exists."""
    await addresses.request_verification(session, manager, body.email)
    return Accepted(detail=_ACCEPTED)


@router.post(
    "/auth/verify",
    tags=["auth"],
    dependencies=VERIFY_LIMITS,
    response_model=User,
    responses=errors(409, 429),
)
async def verify(body: TokenBody, ctx: Ctx, manager: Manager) -> User:
    """Verify an address with the token from the mail (sign-up, or a new address)."""
    user = await addresses.verify(ctx, manager, body.token)
    return User.model_validate(user)


@router.post(
    "/auth/login",
    tags=["auth"],
    dependencies=LOGIN_LIMITS,
    response_model=TokenPair,
    responses=errors(401, 403, 429),
)
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], ctx: Ctx, manager: Manager
) -> TokenPair:
    """Log in with the OAuth2 password form (``username`` is the e-mail address).

    Returns a short-lived access token and a single-use refresh token. An address not
    verified yet gets the 401 of a wrong password (sign-up does not reveal which addresses
    have accounts, so neither may login) and a new verification link by mail.
    """
    pair = await credentials.login(ctx, manager, form)
    return _pair(pair)


@router.post(
    "/auth/refresh",
    tags=["auth"],
    response_model=TokenPair,
    responses=errors(401),
)
async def refresh(body: RefreshBody, ctx: Ctx) -> TokenPair:
    """Trade the refresh token for a new pair; the old refresh token is spent.

    Presenting a refresh token that was already spent ends its whole session (it was copied).
    """
    try:
        pair = await sessions.rotate(ctx.session, ctx.settings, body.refresh_token, ctx.origin)
    except sessions.RefreshReused as exc:
        await sessions.revoke_reused(ctx, exc)
        raise
    return _pair(pair)


@router.post(
    "/auth/logout",
    tags=["auth"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=SIGNED_IN,
)
async def logout(principal: LimitedUser, request: Request, session: DBSession) -> Response:
    """End this session: its access and refresh tokens stop working at once."""
    state = request.app.state
    await tokens.revoke_token(state.redis, principal.claims)
    sid = _sid(principal.claims.session_id)
    if sid is not None:
        await sessions.revoke(session, state.redis, state.settings, principal.user.id, only=[sid])
    else:
        await tokens.revoke_sessions(state.redis, state.settings, [principal.claims.session_id])
    record(
        session,
        "auth.logout",
        origin=Origin.of(request),
        actor_user_id=principal.user.id,
        target_type="session",
        target_id=principal.claims.session_id,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/auth/logout-all",
    tags=["auth"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=SIGNED_IN,
)
async def logout_all(principal: LimitedUser, request: Request, session: DBSession) -> Response:
    """End every session of the account, this one included."""
    state = request.app.state
    await tokens.revoke_token(state.redis, principal.claims)
    await tokens.revoke_sessions(state.redis, state.settings, [principal.claims.session_id])
    ended = await sessions.revoke(session, state.redis, state.settings, principal.user.id)
    record(
        session,
        "auth.logout_all",
        origin=Origin.of(request),
        actor_user_id=principal.user.id,
        target_type="user",
        target_id=principal.user.id,
        data={"sessions_ended": len(ended)},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/auth/forgot-password",
    tags=["auth"],
    dependencies=FORGOT_LIMITS,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=errors(429),
)
async def forgot_password(body: EmailBody, session: DBSession, manager: Manager) -> Accepted:
    """Mail a password reset link (valid 1 hour, single use).

    The answer is the same whether or not the address has an account.
    """
    await credentials.forgot_password(session, manager, body.email)
    return Accepted(detail=_ACCEPTED)


@router.post(
    "/auth/reset-password",
    tags=["auth"],
    response_model=Accepted,
)
async def reset_password(body: ResetPassword, ctx: Ctx, manager: Manager) -> Accepted:
    """Set a new password with the token from the reset mail; every session ends."""
    await credentials.reset_password(ctx, manager, body.token, body.password)
    return Accepted(detail="Your password was changed; log in with the new one.")


# The caller's account ----------------------------------------------------------------------


@router.get("/users/me", tags=["users"], response_model=User, responses=SIGNED_IN)
async def get_me(principal: LimitedUser) -> User:
    """The caller's account."""
    return User.model_validate(principal.user)


@router.patch("/users/me", tags=["users"], response_model=User, responses=SIGNED_IN)
async def update_me(
    body: UserUpdate, principal: LimitedUser, request: Request, session: DBSession
) -> User:
    """Change the caller's name."""
    principal.user.name = body.name
    await session.flush()
    record(session, "user.updated", origin=Origin.of(request), actor_user_id=principal.user.id)
    return User.model_validate(principal.user)


@router.post(
    "/users/me/password",
    tags=["users"],
    dependencies=PASSWORD_CHECK_LIMITS,
    response_model=Accepted,
    responses=SIGNED_IN,
)
async def change_password(body: PasswordChange, principal: LimitedUser, ctx: Ctx) -> Accepted:
    """Change the password (the current one is required); every other session ends."""
    ended = await credentials.change_password(
        ctx, principal.user, principal.claims, body.current_password, body.new_password
    )
    return Accepted(detail=f"Password changed; {ended} other session(s) ended.")


@router.post(
    "/users/me/email",
    tags=["users"],
    dependencies=PASSWORD_CHECK_LIMITS,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=SIGNED_IN,
)
async def change_email(body: EmailChange, principal: LimitedUser, ctx: Ctx) -> Accepted:
    """Start moving the account to a new address.

    A verification link goes to the new address (verify it with ``POST /auth/verify``) and a
    notice to the current one; the change takes effect once the link is followed.
    """
    await addresses.request_email_change(ctx, principal.user, body.new_email, body.password)
    return Accepted(detail="Follow the link we mailed to the new address to confirm it.")


@router.delete(
    "/users/me",
    tags=["users"],
    dependencies=PASSWORD_CHECK_LIMITS,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
    responses=SIGNED_IN | errors(409),
)
async def delete_me(body: PasswordBody, principal: LimitedUser, ctx: Ctx) -> Accepted:
    """Delete the account (the password is required).

    Refused (409, naming them) while the caller is the only owner of tenants that have other
    members. Tenants the caller alone owned are purged in the background (rows, vectors, files,
    cache); a confirmation mail is sent.
    """
    purged = await service.delete_account(ctx, principal.user, body.password)
    return Accepted(detail=f"Your account was deleted; {len(purged)} tenant(s) are being purged.")


@router.get("/users/me/sessions", tags=["users"], response_model=Page[Session], responses=SIGNED_IN)
async def list_sessions(
    principal: LimitedUser, session: DBSession, params: Annotated[Params, Depends()]
) -> Page[Session]:
    """The caller's signed-in devices, most recently used first."""
    current = principal.claims.session_id

    def transform(rows: Sequence[Any]) -> list[Session]:
        return [
            Session(
                id=r.id,
                device=r.user_agent,
                ip=r.ip,
                created_at=r.created_at,
                last_used_at=r.last_used_at,
                current=str(r.id) == current,
            )
            for r in rows
        ]

    return await paginate_query(
        session, sessions.active_sessions_query(principal.user.id), params, transform
    )


@router.delete(
    "/users/me/sessions/{session_id}",
    tags=["users"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=SIGNED_IN | errors(404),
)
async def delete_session(
    session_id: uuid.UUID, principal: LimitedUser, request: Request, session: DBSession
) -> Response:
    """Sign a device out: its tokens stop working at once."""
    row = await session.get(AuthSession, session_id)
    if row is None or row.user_id != principal.user.id or row.revoked_at is not None:
        raise NotFound("Session not found")
    state = request.app.state
    await sessions.revoke(session, state.redis, state.settings, principal.user.id, only=[row.id])
    record(
        session,
        "session.revoked",
        origin=Origin.of(request),
        actor_user_id=principal.user.id,
        target_type="session",
        target_id=row.id,
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# Data export -------------------------------------------------------------------------------


@router.post(
    "/users/me/export",
    tags=["users"],
    dependencies=EXPORT_LIMITS,
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Export,
    responses=SIGNED_IN,
)
async def start_export(principal: LimitedUser, ctx: Ctx) -> Export:
    """Build a ZIP of the caller's data in the background; a mail says when it is ready."""
    export = await service.start_export(ctx, principal.user)
    return Export(**service.describe_export(ctx.settings, export))


@router.get(
    "/users/me/exports/{export_id}",
    tags=["users"],
    response_model=Export,
    responses=SIGNED_IN | errors(404),
)
async def get_export(
    export_id: uuid.UUID, principal: LimitedUser, request: Request, session: DBSession
) -> Export:
    """An export's status and, once ready, a signed download link that expires."""
    export = await service.get_export(session, principal.user, export_id)
    return Export(**service.describe_export(request.app.state.settings, export))


@router.get(
    "/exports/{export_id}/download",
    tags=["users"],
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "The ZIP."},
        **errors(403, 404, 410),
    },
)
async def download_export(
    export_id: uuid.UUID,
    request: Request,
    session: DBSession,
    expires: Annotated[int, Query(description="Expiry (Unix time) from the signed link.")],
    signature: Annotated[str, Query(max_length=128, description="Signature of the link.")],
) -> Response:
    """Download an export through its signed link (no other credentials needed)."""
    settings = request.app.state.settings
    exports.check_signature(settings, export_id, expires, signature)
    export = await session.get(DataExport, export_id)
    if export is None or export.status is not ExportStatus.ready or not export.blob_key:
        raise NotFound("Export not found")
    try:
        data = await get_blobstore(settings).get(export.blob_key)
    except FileNotFoundError:
        raise Gone("This export is no longer stored; request a new one") from None
    return Response(
        content=data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="atrium-export-{export_id}.zip"'},
    )


def _sid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None
