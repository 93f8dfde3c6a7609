"""Logging in and passwords: log in, forgotten-password reset, password change.

Services flush; the request's unit of work commits. Events that must survive a failed request
(a failed login here, a replayed refresh token in :mod:`atrium.accounts.sessions`) are written
in their own transaction (:meth:`atrium.context.ServiceContext.detached`). A login of an
address not verified yet gets the answer of a wrong password, so log-in never tells a new
address from a registered one.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.security import OAuth2PasswordRequestForm
from fastapi_users import exceptions as fu_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts import sessions
from atrium.accounts.manager import UserManager, build_user_manager
from atrium.accounts.passwords import (
    check_current_password,
    check_password,
    invalid_password,
    password_helper,
)
from atrium.audit.service import record
from atrium.auth.tokens import AccessClaims
from atrium.context import ServiceContext
from atrium.kit import ratelimit
from atrium.kit.errors import BadRequest, Forbidden, Unauthorized
from atrium.models import User
from atrium.models.accounts import user_email_col

_DUMMY_HASH = password_helper.hash("atrium-timing-equaliser")
#: A failed login's answer: wrong address, wrong password, or an address not verified yet.
BAD_CREDENTIALS = "Incorrect e-mail address or password"
#: New verification links a login of an unverified address mails: (times, per seconds).
LOGIN_VERIFY_MAIL_LIMIT = (3, 3600)


async def record_detached(ctx: ServiceContext, action: str, **kwargs: Any) -> None:
    """Write an audit event in its own transaction (for calls that end in an error)."""
    async with ctx.detached() as session:
        record(session, action, origin=ctx.origin, **kwargs)


async def login(
    ctx: ServiceContext, manager: UserManager, form: OAuth2PasswordRequestForm
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
            ctx, "auth.login_failed", data={"email": form.username[:320], "reason": "password"}
        )
        raise Unauthorized(BAD_CREDENTIALS)
    if not user.is_active:
        await record_detached(
            ctx, "auth.login_failed", actor_user_id=user.id, data={"reason": "disabled"}
        )
        raise Forbidden("This account is disabled; contact support")
    if not user.is_verified:
        await _remind_unverified(ctx, user)
        raise Unauthorized(BAD_CREDENTIALS)
    pair = await sessions.start_session(ctx.session, ctx.settings, user, ctx.origin)
    record(
        ctx.session,
        "auth.login",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="session",
        target_id=pair.session_id,
    )
    return pair


async def _remind_unverified(ctx: ServiceContext, user: User) -> None:
    """Record the failed login of an unverified address and mail it a new verification link.

    Both in their own transaction (the request fails). The mail goes at most
    :data:`LOGIN_VERIFY_MAIL_LIMIT` times per window per account, counted in a bucket of its
    own and never refused out loud: a 429, or a spent request-verify-token bucket, would again
    tell a new address from a registered one.
    """
    user_id = user.id  # read now: rolling the request's unit back expires ``user``
    times, seconds = LOGIN_VERIFY_MAIL_LIMIT
    bucket = ratelimit.Bucket(
        f"atrium:rl:login-verify-mail:{user_id}", times, seconds, "login-verify-mail"
    )
    state = await ratelimit.hit(ctx.redis, bucket)
    async with ctx.detached() as session:
        record(
            session,
            "auth.login_failed",
            origin=ctx.origin,
            actor_user_id=user_id,
            data={"reason": "unverified", "verification_mailed": state.allowed},
        )
        if state.allowed:
            fresh = await session.get(User, user_id)
            if fresh is not None and not fresh.is_verified:
                await build_user_manager(session, ctx.settings).request_verify(fresh)


async def forgot_password(session: AsyncSession, manager: UserManager, email: str) -> None:
    """Mail a reset link if the address has an active account; the caller learns nothing."""
    user = await session.scalar(select(User).where(func.lower(user_email_col) == email))
    if user is None or not user.is_active:
        # Spend the same argon2 time as the real path so timing tells nothing either.
        password_helper.verify_and_update("x", _DUMMY_HASH)
        return
    await manager.forgot_password(user)


async def reset_password(
    ctx: ServiceContext, manager: UserManager, token: str, password: str
) -> None:
    """Set a new password from a reset token; every session of the account ends.

    Raises:
        BadRequest: the token is invalid, expired or already used.
        Unprocessable: the password breaks a rule.
    """
    bad = BadRequest("This reset link is invalid, expired or already used; ask for a new one")
    try:
        user = await manager.reset_password(token, password)
    except (fu_exc.InvalidResetPasswordToken, fu_exc.UserInactive, fu_exc.UserNotExists):
        raise bad from None
    except fu_exc.InvalidPasswordException as exc:
        raise invalid_password(exc, "password") from None
    ended = await sessions.revoke(ctx.session, ctx.redis, ctx.settings, user.id)
    record(
        ctx.session,
        "user.password_reset",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"sessions_ended": len(ended)},
    )


async def change_password(
    ctx: ServiceContext, user: User, claims: AccessClaims, current: str, new: str
) -> int:
    """Change the password; every other session ends. Returns how many ended.

    Raises:
        Forbidden: ``current`` is wrong.
        Unprocessable: ``new`` breaks a rule.
    """
    check_current_password(user, current)
    check_password(new, user.email, field="new_password")
    user.hashed_password = password_helper.hash(new)
    await ctx.session.flush()
    keep = uuid.UUID(claims.session_id) if _is_uuid(claims.session_id) else None
    ended = await sessions.revoke(ctx.session, ctx.redis, ctx.settings, user.id, keep=keep)
    record(
        ctx.session,
        "user.password_changed",
        origin=ctx.origin,
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
