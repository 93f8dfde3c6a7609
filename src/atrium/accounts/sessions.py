"""Login sessions: the refresh-token family of one device, with rotation and reuse detection.

Each login creates an :class:`AuthSession`. Its refresh token is single use: refreshing swaps the
session's ``refresh_jti`` for a new one with a compare-and-set UPDATE, so two concurrent refreshes
cannot both win. A refresh token that is valid but no longer current was already spent; whoever
presents it (the owner or a thief) ends the whole session, and the session's access tokens are
denylisted in Redis at once.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.audit.service import Origin, record
from atrium.auth import tokens
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit.errors import Unauthorized
from atrium.models import AuthSession, User, utcnow


@dataclass(frozen=True)
class TokenPair:
    """What login and refresh return."""

    access_token: str
    refresh_token: str
    expires_in: int
    session_id: uuid.UUID


class RefreshReused(Unauthorized):
    """A spent refresh token was presented; its session has been ended."""

    def __init__(self, session_id: uuid.UUID, user_id: uuid.UUID) -> None:
        super().__init__(
            "This refresh token was already used. For your safety the session it belongs to has "
            "been ended; log in again."
        )
        self.session_id = session_id
        self.user_id = user_id


def _new_jti() -> str:
    return uuid.uuid4().hex


async def _pair(settings: Settings, user_id: uuid.UUID, sid: uuid.UUID, jti: str) -> TokenPair:
    return TokenPair(
        access_token=await tokens.create_access_token(user_id, str(sid)),
        refresh_token=await tokens.create_refresh_token(user_id, str(sid), jti),
        expires_in=settings.access_token_ttl_seconds,
        session_id=sid,
    )


async def start_session(
    session: AsyncSession, settings: Settings, user: User, origin: Origin
) -> TokenPair:
    """Open a session for ``user`` (login) and issue its first token pair."""
    now = utcnow()
    row = AuthSession(
        id=uuid.uuid4(),
        user_id=user.id,
        refresh_jti=_new_jti(),
        user_agent=origin.user_agent,
        ip=origin.ip,
        created_at=now,
        last_used_at=now,
        expires_at=now + dt.timedelta(seconds=settings.refresh_token_ttl_seconds),
    )
    session.add(row)
    await session.flush()
    return await _pair(settings, user.id, row.id, row.refresh_jti)


async def rotate(
    session: AsyncSession, settings: Settings, refresh_token: str, origin: Origin
) -> TokenPair:
    """Spend ``refresh_token`` and issue the next pair of its session.

    Raises:
        Unauthorized: the token is invalid or expired, or its session has ended.
        RefreshReused: the token was already spent (the caller must revoke the session
            in a transaction that survives this request's rollback).
    """
    claims = await tokens.decode_refresh_token(refresh_token)
    try:
        sid = uuid.UUID(claims.session_id)
    except ValueError:
        raise Unauthorized("Invalid refresh token") from None
    row = await session.get(AuthSession, sid)
    ended = Unauthorized("This session has ended; log in again")
    if row is None or row.user_id != claims.user_id or row.revoked_at is not None:
        raise ended
    if row.expires_at <= utcnow():
        raise ended
    user = await session.get(User, row.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("This account is disabled or no longer exists")
    if row.refresh_jti != claims.jti:
        raise RefreshReused(sid, row.user_id)
    new_jti = _new_jti()
    result = await session.execute(
        update(AuthSession)
        .where(
            AuthSession.id == sid,
            AuthSession.refresh_jti == claims.jti,
            AuthSession.revoked_at.is_(None),
        )
        .values(
            refresh_jti=new_jti,
            last_used_at=utcnow(),
            ip=origin.ip,
            user_agent=origin.user_agent or row.user_agent,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        # Another refresh with the same token won the race: this one is a replay.
        raise RefreshReused(sid, row.user_id)
    return await _pair(settings, row.user_id, sid, new_jti)


async def revoke(
    session: AsyncSession,
    redis: Redis,
    settings: Settings,
    user_id: uuid.UUID,
    *,
    only: list[uuid.UUID] | None = None,
    keep: uuid.UUID | None = None,
) -> list[uuid.UUID]:
    """End sessions of ``user_id`` (``only`` these, or all but ``keep``); returns their ids.

    Their access tokens are refused at once: the session ids are denylisted in Redis for one
    access-token lifetime, and no refresh token of theirs will rotate again.
    """
    stmt = select(AuthSession.id).where(
        AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None)
    )
    if only is not None:
        stmt = stmt.where(AuthSession.id.in_(only))
    if keep is not None:
        stmt = stmt.where(AuthSession.id != keep)
    ids = list((await session.execute(stmt)).scalars())
    if not ids:
        return []
    await session.execute(
        update(AuthSession)
        .where(AuthSession.id.in_(ids))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    # Denylist first: if the commit later fails, tokens are refused anyway (fail closed).
    await tokens.revoke_sessions(redis, settings, [str(i) for i in ids])
    return ids


async def revoke_reused(ctx: ServiceContext, exc: RefreshReused) -> None:
    """End the session of a replayed refresh token, in its own committed transaction."""
    async with ctx.detached() as session:
        await revoke(session, ctx.redis, ctx.settings, exc.user_id, only=[exc.session_id])
        record(
            session,
            "auth.refresh_reuse_detected",
            origin=ctx.origin,
            actor_user_id=exc.user_id,
            target_type="session",
            target_id=exc.session_id,
        )


def active_sessions_query(user_id: uuid.UUID) -> Select[tuple[AuthSession]]:
    """The user's sessions still usable, most recently used first."""
    return (
        select(AuthSession)
        .where(
            AuthSession.user_id == user_id,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > utcnow(),
        )
        .order_by(AuthSession.last_used_at.desc(), AuthSession.id)
    )
