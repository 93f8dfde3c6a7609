"""The account lifecycle: register, log in, verify, reset, change password or address, delete.

Services flush; the request's unit of work commits. Events that must survive a failed request
(a failed login, a replayed refresh token) are written in their own transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

import jwt
from fastapi import Request
from fastapi.security import OAuth2PasswordRequestForm
from fastapi_users import exceptions as fu_exc
from fastapi_users.jwt import decode_jwt, generate_jwt
from redis.asyncio import Redis
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts import exports, sessions
from atrium.accounts.manager import (
    VERIFY_TOKEN_LIFETIME,
    UserManager,
    build_user_manager,
    link,
    send_mail,
)
from atrium.accounts.passwords import check_password, password_helper
from atrium.accounts.schemas import NewUser, UserCreate
from atrium.apikeys.service import revoke_keys_created_by
from atrium.audit.service import record
from atrium.auth.tokens import AccessClaims
from atrium.config import Settings
from atrium.kit import ratelimit
from atrium.kit.db import abandon_request_unit, unit_of_work
from atrium.kit.enqueue import enqueue
from atrium.kit.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, Unprocessable
from atrium.models import DataExport, ExportStatus, Role, Tenant, TenantStatus, User, utcnow
from atrium.models.accounts import user_email_col, user_id_col
from atrium.tenants import invitations
from atrium.tenants import service as tenants
from atrium.tenants.schemas import TenantWithRole

EMAIL_CHANGE_AUDIENCE = "atrium:email-change"
EXPORT_TASK = "atrium.accounts.export"
PURGE_USER_FILES_TASK = "atrium.accounts.purge_user_files"
_DUMMY_HASH = password_helper.hash("atrium-timing-equaliser")
#: A failed login's answer: wrong address, wrong password, or an address not verified yet.
BAD_CREDENTIALS = "Incorrect e-mail address or password"
#: New verification links a login of an unverified address mails: (times, per seconds).
LOGIN_VERIFY_MAIL_LIMIT = (3, 3600)
#: The plan a new tenant starts on (the column's default).
DEFAULT_PLAN: str = Tenant.__table__.c.plan.default.arg


async def record_detached(request: Request, action: str, **kwargs: Any) -> None:
    """Write an audit event in its own transaction (for requests that end in an error)."""
    await abandon_request_unit(request)
    async with unit_of_work(request.app.state.sessionmaker) as session:
        record(session, action, request=request, **kwargs)


def _invalid_password(exc: fu_exc.InvalidPasswordException, field: str) -> Unprocessable:
    rule = str(exc.reason)
    message = {
        "min_length": "The password is too short.",
        "max_length": "The password is too long.",
        "not_email": "The password must not be your e-mail address.",
        "not_common": "This password is too common; choose one that is harder to guess.",
    }.get(rule, "The password is not acceptable.")
    return Unprocessable(message, detail={"message": message, "rule": rule, "field": field})


def _default_tenant_name(user: User) -> str:
    who = user.name or user.email.split("@", 1)[0]
    return f"{who}'s workspace"[:200]


async def register(
    session: AsyncSession,
    manager: UserManager,
    body: UserCreate,
    request: Request,
) -> tuple[User, TenantWithRole]:
    """Create an account, and its own tenant or the membership its invitation offers.

    An address that already has an account gets the same answer as a new one, so sign-up
    cannot tell anyone which addresses are registered; the owner of the address is told by
    mail instead (see :func:`_registered_again`).

    Raises:
        Unprocessable: the password breaks a rule.
        Conflict: with an invitation token, the invited address already has an account (only
            the holder of the invitation mail learns it), or two sign-ups raced.
        NotFound, Gone, Forbidden: the invitation token is unusable or for another address.
    """
    check_password(body.password, body.email)
    invitation = None
    if body.invitation_token:
        invitation = await invitations.find_usable(session, body.invitation_token)
        if invitation[0].email != body.email:
            raise Forbidden(
                "This invitation was sent to another e-mail address; register with the "
                "address that received it"
            )
    try:
        user = await manager.create(
            NewUser(
                email=body.email,
                password=body.password,
                name=body.name,
                is_verified=invitation is not None,
            ),
            safe=False,
            request=request,
        )
    except fu_exc.UserAlreadyExists:
        if invitation is None:
            return await _registered_again(session, manager.settings, body)
        raise Conflict(
            "An account with this e-mail address already exists; log in, or reset the password "
            "if you forgot it"
        ) from None
    except IntegrityError:
        # Two sign-ups of one new address at the same moment: the later one learns nothing
        # about anybody else's address.
        raise Conflict("This address was just registered; log in, or reset the password") from None
    except fu_exc.InvalidPasswordException as exc:
        raise _invalid_password(exc, "password") from None
    record(
        session,
        "user.registered",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"via_invitation": invitation is not None},
    )
    if invitation is not None:
        inv, tenant = invitation
        role = await invitations.accept(session, inv, tenant, user, request)
    else:
        tenant = await tenants.create_tenant(
            session, user, body.tenant_name or _default_tenant_name(user), request
        )
        role = Role.owner
        await manager.request_verify(user, request)
    out = TenantWithRole(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,
        plan=tenant.plan,
        created_at=tenant.created_at,
        role=role,
    )
    return user, out


async def _registered_again(
    session: AsyncSession, settings: Settings, body: UserCreate
) -> tuple[User, TenantWithRole]:
    """The answer to a sign-up with an address that already has an account.

    The response has the status and shape of a real sign-up (its ids are fresh and stored
    nowhere: nobody can log in without the account's own password anyway), and the password
    is hashed as a real sign-up would, so the time taken tells little either. Its timestamps
    are taken as a real sign-up's are: the user's when it is written, the tenant's after
    another write (here the notice's), so the tenant is a little younger than the user, as
    in a real answer. The owner of the address gets a mail pointing to log-in and password
    reset.
    """
    password_helper.hash(body.password)
    user = User(
        id=uuid.uuid4(),
        email=body.email,
        name=body.name,
        is_verified=False,
        is_superuser=False,
        created_at=utcnow(),
    )
    send_mail(
        session,
        "account_exists",
        body.email,
        {
            "login_link": f"{settings.resolved_public_url}/login",
            "reset_link": f"{settings.resolved_public_url}/forgot-password",
        },
    )
    await session.flush()
    tenant = TenantWithRole(
        id=uuid.uuid4(),
        name=body.tenant_name or _default_tenant_name(user),
        status=TenantStatus.active,
        plan=DEFAULT_PLAN,
        created_at=utcnow(),
        role=Role.owner,
    )
    return user, tenant


async def accept_invitation_as_new_user(
    session: AsyncSession,
    manager: UserManager,
    token: str,
    password: str,
    name: str,
    request: Request,
) -> tuple[User, TenantWithRole]:
    """Create the account of an invited address and join the tenant in one step."""
    inv, tenant = await invitations.find_usable(session, token)
    check_password(password, inv.email)
    existing = await session.scalar(
        select(user_id_col).where(func.lower(user_email_col) == inv.email)
    )
    if existing is not None:
        # Only the holder of the invitation mail learns this: it was sent to that address.
        raise Conflict("You already have an account: log in, then accept the invitation")
    try:
        user = await manager.create(
            NewUser(email=inv.email, password=password, name=name, is_verified=True),
            safe=False,
            request=request,
        )
    except (fu_exc.UserAlreadyExists, IntegrityError):
        raise Conflict("You already have an account: log in, then accept the invitation") from None
    except fu_exc.InvalidPasswordException as exc:
        raise _invalid_password(exc, "password") from None
    record(
        session,
        "user.registered",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"via_invitation": True},
    )
    role = await invitations.accept(session, inv, tenant, user, request)
    return user, TenantWithRole(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,
        plan=tenant.plan,
        created_at=tenant.created_at,
        role=role,
    )


async def login(
    session: AsyncSession,
    settings: Settings,
    manager: UserManager,
    form: OAuth2PasswordRequestForm,
    request: Request,
) -> sessions.TokenPair:
    """Check the credentials and open a session.

    An address that is not verified yet gets the answer of a wrong password, and a new
    verification link by mail (:func:`_remind_unverified`): anyone can sign up with any
    address and its own password, so a different answer would tell whether that sign-up made
    an account (a new address) or not (a registered one, whose password is another).

    Raises:
        Unauthorized: wrong address or password, or the address is not verified yet (the
            same answer for all three).
        Forbidden: the account is disabled.
    """
    form.username = form.username.strip().lower()
    user = await manager.authenticate(form)
    if user is None:
        await record_detached(
            request, "auth.login_failed", data={"email": form.username[:320], "reason": "password"}
        )
        raise Unauthorized(BAD_CREDENTIALS)
    if not user.is_active:
        await record_detached(
            request, "auth.login_failed", actor_user_id=user.id, data={"reason": "disabled"}
        )
        raise Forbidden("This account is disabled; contact support")
    if not user.is_verified:
        await _remind_unverified(request, manager.settings, user)
        raise Unauthorized(BAD_CREDENTIALS)
    pair = await sessions.start_session(session, settings, user, request)
    record(
        session,
        "auth.login",
        request=request,
        actor_user_id=user.id,
        target_type="session",
        target_id=pair.session_id,
    )
    return pair


async def _remind_unverified(request: Request, settings: Settings, user: User) -> None:
    """Record the failed login of an unverified address and mail it a new verification link.

    Both in their own transaction (the request fails). The mail goes at most
    :data:`LOGIN_VERIFY_MAIL_LIMIT` times per window per account, counted in a bucket of its
    own and never refused out loud: a 429, or a spent request-verify-token bucket, would again
    tell a new address from a registered one.
    """
    user_id = user.id  # read now: rolling the request's unit back expires ``user``
    times, seconds = LOGIN_VERIFY_MAIL_LIMIT
    state = await ratelimit.hit(
        request.app.state.redis,
        f"atrium:rl:login-verify-mail:{user_id}",
        times,
        seconds,
        name="login-verify-mail",
    )
    await abandon_request_unit(request)
    async with unit_of_work(request.app.state.sessionmaker) as session:
        record(
            session,
            "auth.login_failed",
            request=request,
            actor_user_id=user_id,
            data={"reason": "unverified", "verification_mailed": state.allowed},
        )
        if state.allowed:
            fresh = await session.get(User, user_id)
            if fresh is not None and not fresh.is_verified:
                await build_user_manager(session, settings).request_verify(fresh, request)


async def request_verification(
    session: AsyncSession, manager: UserManager, email: str, request: Request
) -> None:
    """Mail a new verification link if the address has an unverified account (silently not)."""
    user = await session.scalar(select(User).where(func.lower(user_email_col) == email))
    if user is not None and user.is_active and not user.is_verified:
        await manager.request_verify(user, request)


def _email_change_token(settings: Settings, user: User, new_email: str) -> str:
    return generate_jwt(
        {"sub": str(user.id), "old": user.email, "new": new_email, "aud": EMAIL_CHANGE_AUDIENCE},
        settings.secret_key.get_secret_value(),
        VERIFY_TOKEN_LIFETIME,
    )


def token_audience(token: str) -> tuple[str | None, str | None]:
    """The audience and address named by a mail token, read WITHOUT verifying it.

    Used only to route the token and to key rate limits; the token is verified afterwards.
    """
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None, None
    aud = claims.get("aud")
    email = claims.get("email") or claims.get("new")
    return (aud if isinstance(aud, str) else None), (email if isinstance(email, str) else None)


_BAD_VERIFY = "This verification link is invalid or has expired; ask for a new one"


async def verify(
    session: AsyncSession, settings: Settings, manager: UserManager, token: str, request: Request
) -> User:
    """Verify an address: a new account's, or the new address of an e-mail change.

    Raises:
        BadRequest: the token is invalid or expired.
        Conflict: already verified, or the new address was taken meanwhile.
    """
    aud, _ = token_audience(token)
    if aud == EMAIL_CHANGE_AUDIENCE:
        return await _confirm_email_change(session, settings, token, request)
    try:
        user = await manager.verify(token, request)
    except fu_exc.InvalidVerifyToken:
        raise BadRequest(_BAD_VERIFY) from None
    except fu_exc.UserAlreadyVerified:
        raise Conflict("This e-mail address is already verified; you can log in") from None
    record(session, "user.verified", request=request, actor_user_id=user.id, target_id=user.id)
    return user


async def _confirm_email_change(
    session: AsyncSession, settings: Settings, token: str, request: Request
) -> User:
    try:
        data = decode_jwt(token, settings.secret_key.get_secret_value(), [EMAIL_CHANGE_AUDIENCE])
        user_id = uuid.UUID(str(data["sub"]))
        old, new = str(data["old"]), str(data["new"])
    except (jwt.PyJWTError, KeyError, ValueError):
        raise BadRequest(_BAD_VERIFY) from None
    user = await session.get(User, user_id)
    # The token names the address it replaces: once used (or superseded) it no longer matches.
    if user is None or not user.is_active or user.email != old:
        raise BadRequest(_BAD_VERIFY)
    taken = await session.scalar(
        select(user_id_col).where(func.lower(user_email_col) == new, user_id_col != user.id)
    )
    if taken is not None:
        raise Conflict("This address is now used by another account; choose another one")
    user.email = new
    user.is_verified = True
    try:
        await session.flush()
    except IntegrityError:
        raise Conflict("This address is now used by another account; choose another one") from None
    record(
        session,
        "user.email_changed",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"from": old, "to": new},
    )
    return user


async def forgot_password(
    session: AsyncSession, manager: UserManager, email: str, request: Request
) -> None:
    """Mail a reset link if the address has an active account; the caller learns nothing."""
    user = await session.scalar(select(User).where(func.lower(user_email_col) == email))
    if user is None or not user.is_active:
        # Spend the same argon2 time as the real path so timing tells nothing either.
        password_helper.verify_and_update("x", _DUMMY_HASH)
        return
    await manager.forgot_password(user, request)


async def reset_password(
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    manager: UserManager,
    token: str,
    password: str,
    request: Request,
) -> None:
    """Set a new password from a reset token; every session of the account ends.

    Raises:
        BadRequest: the token is invalid, expired or already used.
        Unprocessable: the password breaks a rule.
    """
    bad = BadRequest("This reset link is invalid, expired or already used; ask for a new one")
    try:
        user = await manager.reset_password(token, password, request)
    except (fu_exc.InvalidResetPasswordToken, fu_exc.UserInactive, fu_exc.UserNotExists):
        raise bad from None
    except fu_exc.InvalidPasswordException as exc:
        raise _invalid_password(exc, "password") from None
    ended = await sessions.revoke(session, redis, settings, user.id)
    record(
        session,
        "user.password_reset",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"sessions_ended": len(ended)},
    )


def _check_current_password(user: User, password: str) -> None:
    ok, _ = password_helper.verify_and_update(password, user.hashed_password)
    if not ok:
        raise Forbidden("The password is incorrect")


async def change_password(
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    user: User,
    claims: AccessClaims,
    current: str,
    new: str,
    request: Request,
) -> int:
    """Change the password; every other session ends. Returns how many ended.

    Raises:
        Forbidden: ``current`` is wrong.
        Unprocessable: ``new`` breaks a rule.
    """
    _check_current_password(user, current)
    check_password(new, user.email, field="new_password")
    user.hashed_password = password_helper.hash(new)
    await session.flush()
    keep = uuid.UUID(claims.session_id) if _is_uuid(claims.session_id) else None
    ended = await sessions.revoke(session, redis, settings, user.id, keep=keep)
    record(
        session,
        "user.password_changed",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"sessions_ended": len(ended)},
    )
    return len(ended)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def request_email_change(
    session: AsyncSession,
    settings: Settings,
    user: User,
    new_email: str,
    password: str,
    request: Request,
) -> None:
    """Mail a verification link to ``new_email`` and a notice to the current address.

    Nothing changes until the link is followed. If the new address already has an account no
    mail goes to it, and the answer is the same, so this route tells nothing about it.

    Raises:
        Forbidden: the password is wrong.
        Unprocessable: the new address is the current one.
    """
    _check_current_password(user, password)
    if new_email == user.email:
        raise Unprocessable("This is already your e-mail address")
    record(
        session,
        "user.email_change_requested",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"to": new_email},
    )
    taken = await session.scalar(select(user_id_col).where(func.lower(user_email_col) == new_email))
    if taken is not None:
        return
    token = _email_change_token(settings, user, new_email)
    name = user.name or user.email
    send_mail(
        session,
        "email_change",
        new_email,
        {
            "name": name,
            "link": link(settings, "/verify-email", token=token),
            "hours": VERIFY_TOKEN_LIFETIME // 3600,
        },
    )
    send_mail(
        session,
        "email_change_notice",
        user.email,
        {"name": name, "new_email": new_email},
    )


async def delete_account(
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    user: User,
    password: str,
    request: Request,
) -> list[uuid.UUID]:
    """Delete the account; purge the tenants it alone owned. Returns the purged tenant ids.

    Every API key the user created, in any tenant, is revoked first (the database would only
    forget who created it: the key would keep working).

    Raises:
        Forbidden: the password is wrong.
        Conflict: the user is the only owner of tenants that have other members (named).
    """
    _check_current_password(user, password)
    owned = await tenants.sole_owner_tenants(session, user.id)
    blocked = sorted(t.name for t, others in owned if others > 0)
    if blocked:
        names = ", ".join(blocked)
        raise Conflict(
            f"You are the only owner of {names}, which other people use. Transfer ownership "
            "to another member, or remove the members, before deleting your account.",
            detail={
                "message": "Transfer ownership of these tenants before deleting your account",
                "tenants": blocked,
            },
        )
    purged: list[uuid.UUID] = []
    for tenant, _ in owned:
        await tenants.schedule_purge(
            session,
            tenant,
            actor_user_id=user.id,
            request=request,
            reason="account deleted",
            redis=redis,
        )
        purged.append(tenant.id)
    await sessions.revoke(session, redis, settings, user.id)
    await revoke_keys_created_by(
        session,
        redis,
        user.id,
        reason="account_deleted",
        actor_user_id=user.id,
        request=request,
    )
    record(
        session,
        "user.deleted",
        request=request,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"purged_tenants": [str(t) for t in purged]},
    )
    send_mail(session, "account_deleted", user.email, {"name": user.name or user.email})
    enqueue(session, PURGE_USER_FILES_TASK, user_id=str(user.id))
    # Core DELETE: the database cascades memberships, sessions and exports.
    await session.execute(delete(User).where(user_id_col == user.id))
    session.expunge(user)
    return purged


async def start_export(session: AsyncSession, user: User, request: Request) -> DataExport:
    """Create an export and enqueue the job that builds it."""
    export = DataExport(id=uuid.uuid4(), user_id=user.id, status=ExportStatus.pending)
    session.add(export)
    await session.flush()
    record(
        session,
        "user.export_requested",
        request=request,
        actor_user_id=user.id,
        target_type="export",
        target_id=export.id,
    )
    enqueue(session, EXPORT_TASK, export_id=str(export.id), user_id=str(user.id))
    return export


async def get_export(session: AsyncSession, user: User, export_id: uuid.UUID) -> DataExport:
    """One of the caller's exports.

    Raises:
        NotFound: no such export of theirs.
    """
    export = await session.get(DataExport, export_id)
    if export is None or export.user_id != user.id:
        raise NotFound("Export not found")
    return export


def describe_export(settings: Settings, export: DataExport) -> dict[str, Any]:
    """Response fields of an export, with a fresh signed link when it is ready."""
    url, expires_at = (None, None)
    if export.status is ExportStatus.ready:
        url, expires_at = exports.signed_url(settings, export.id)
    return {
        "id": export.id,
        "status": export.status,
        "created_at": export.created_at,
        "completed_at": export.completed_at,
        "size_bytes": export.size_bytes,
        "error": export.error,
        "download_url": url,
        "download_expires_at": expires_at,
    }
