"""E-mail addresses: verifying a new account's address, and changing an account's address.

Both end at the same link (``/verify-email``): :func:`verify` reads the token's audience and
either verifies a new account (fastapi-users' token) or confirms an address change (ours,
:data:`EMAIL_CHANGE_AUDIENCE`). An address change takes effect only once that link is followed.
"""

from __future__ import annotations

import uuid

import jwt
from fastapi_users import exceptions as fu_exc
from fastapi_users.jwt import decode_jwt, generate_jwt
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts.manager import VERIFY_TOKEN_LIFETIME, UserManager, link, send_mail
from atrium.accounts.passwords import check_current_password
from atrium.audit.service import record
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit.errors import BadRequest, Conflict, Unprocessable
from atrium.models import User
from atrium.models.accounts import user_email_col, user_id_col

EMAIL_CHANGE_AUDIENCE = "atrium:email-change"


async def request_verification(session: AsyncSession, manager: UserManager, email: str) -> None:
    """Mail a new verification link if the address has an unverified account (silently not)."""
    user = await session.scalar(select(User).where(func.lower(user_email_col) == email))
    if user is not None and user.is_active and not user.is_verified:
        await manager.request_verify(user)


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


async def verify(ctx: ServiceContext, manager: UserManager, token: str) -> User:
    """Verify an address: a new account's, or the new address of an e-mail change.

    Raises:
        BadRequest: the token is invalid or expired.
        Conflict: already verified, or the new address was taken meanwhile.
    """
    aud, _ = token_audience(token)
    if aud == EMAIL_CHANGE_AUDIENCE:
        return await _confirm_email_change(ctx, token)
    try:
        user = await manager.verify(token)
    except fu_exc.InvalidVerifyToken:
        raise BadRequest(_BAD_VERIFY) from None
    except fu_exc.UserAlreadyVerified:
        raise Conflict("This e-mail address is already verified; you can log in") from None
    record(
        ctx.session, "user.verified", origin=ctx.origin, actor_user_id=user.id, target_id=user.id
    )
    return user


async def _confirm_email_change(ctx: ServiceContext, token: str) -> User:
    session, settings = ctx.session, ctx.settings
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
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"from": old, "to": new},
    )
    return user


async def request_email_change(
    ctx: ServiceContext, user: User, new_email: str, password: str
) -> None:
    """Mail a verification link to ``new_email`` and a notice to the current address.

    Nothing changes until the link is followed. If the new address already has an account no
    mail goes to it, and the answer is the same, so this route tells nothing about it.

    Raises:
        Forbidden: the password is wrong.
        Unprocessable: the new address is the current one.
    """
    session, settings = ctx.session, ctx.settings
    check_current_password(user, password)
    if new_email == user.email:
        raise Unprocessable("This is already your e-mail address")
    record(
        session,
        "user.email_change_requested",
        origin=ctx.origin,
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
