"""Access tokens (JWT via async-fastapi-jwt-auth) and their revocation in Redis.

An access token carries the user (``sub``), its session (``sid``) and its own id (``jti``).
Logging out denylists the ``jti``; ending a session denylists the ``sid``: both keys live in
Redis only until the longest access token they could cover expires.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from async_fastapi_jwt_auth import AuthJWT
from async_fastapi_jwt_auth.exceptions import AuthJWTException, JWTDecodeError
from redis.asyncio import Redis

from atrium.config import Settings
from atrium.kit.errors import Unauthorized

REVOKED_JTI = "atrium:revoked:jti:"
REVOKED_SID = "atrium:revoked:sid:"

#: Older secrets still accepted when verifying (ATRIUM_PREVIOUS_SECRET_KEYS), set by configure_jwt.
_previous_keys: list[str] = []


def configure_jwt(settings: Settings) -> None:
    """Point async-fastapi-jwt-auth at our secret and lifetimes (it keeps class-level config)."""

    def _config() -> list[tuple[str, Any]]:
        return [
            ("authjwt_secret_key", settings.secret_key.get_secret_value()),
            ("authjwt_algorithm", "HS256"),
            ("authjwt_token_location", {"headers"}),
            ("authjwt_decode_leeway", 5),
            (
                "authjwt_access_token_expires",
                dt.timedelta(seconds=settings.access_token_ttl_seconds),
            ),
            (
                "authjwt_refresh_token_expires",
                dt.timedelta(seconds=settings.refresh_token_ttl_seconds),
            ),
        ]

    AuthJWT.load_config(_config)
    _previous_keys[:] = [k.get_secret_value() for k in settings.previous_secret_keys]


async def verified_claims(token: str) -> dict[str, Any]:
    """Claims of a token signed with the current secret or, during a rotation, an older one.

    New tokens are always signed with ``ATRIUM_SECRET_KEY``; tokens signed before a rotation keep
    working while their key is listed in ``ATRIUM_PREVIOUS_SECRET_KEYS`` (the key ring).

    Raises:
        AuthJWTException: when no key verifies the token, or it expired.
    """
    try:
        return dict(await AuthJWT().get_raw_jwt(token) or {})
    except AuthJWTException as exc:
        message = str(getattr(exc, "message", "")).lower()
        if not _previous_keys or "signature verification" not in message:
            raise
        for key in _previous_keys:
            try:
                return dict(jwt.decode(token, key, algorithms=["HS256"], leeway=5))
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as err:
                raise JWTDecodeError(status_code=422, message=str(err)) from None
        raise


@dataclass(frozen=True)
class AccessClaims:
    """The verified claims of an access token."""

    user_id: uuid.UUID
    session_id: str
    jti: str
    expires_at: int


async def create_access_token(user_id: uuid.UUID, session_id: str) -> str:
    """Sign an access token for ``user_id`` in session ``session_id``."""
    token: str = await AuthJWT().create_access_token(
        subject=str(user_id), user_claims={"sid": session_id}
    )
    return token


async def decode_access_token(token: str) -> AccessClaims:
    """Verify signature, expiry and type.

    Raises:
        Unauthorized: for any invalid, expired or non-access token.
    """
    try:
        raw = await verified_claims(token)
    except AuthJWTException as exc:
        message = str(getattr(exc, "message", "")) or "invalid token"
        if "expired" in message.lower():
            raise Unauthorized("Access token expired; refresh it or log in again") from None
        raise Unauthorized("Invalid access token") from None
    if not raw or raw.get("type") != "access" or "sid" not in raw:
        raise Unauthorized("Invalid access token")
    try:
        user_id = uuid.UUID(str(raw["sub"]))
    except ValueError:
        raise Unauthorized("Invalid access token") from None
    return AccessClaims(
        user_id=user_id, session_id=str(raw["sid"]), jti=str(raw["jti"]), expires_at=int(raw["exp"])
    )


@dataclass(frozen=True)
class RefreshClaims:
    """The verified claims of a refresh token."""

    user_id: uuid.UUID
    session_id: str
    jti: str
    expires_at: int


async def create_refresh_token(user_id: uuid.UUID, session_id: str, jti: str) -> str:
    """Sign a refresh token for session ``session_id`` with our own ``jti``.

    The caller stores ``jti`` as the session's only live refresh token (rotation and reuse
    detection compare against it), so it is chosen here rather than by the library.
    """
    token: str = await AuthJWT().create_refresh_token(
        subject=str(user_id), user_claims={"sid": session_id, "jti": jti}
    )
    return token


async def decode_refresh_token(token: str) -> RefreshClaims:
    """Verify signature, expiry and type of a refresh token.

    Raises:
        Unauthorized: for any invalid, expired or non-refresh token.
    """
    try:
        raw = await verified_claims(token)
    except AuthJWTException as exc:
        message = str(getattr(exc, "message", "")) or "invalid token"
        if "expired" in message.lower():
            raise Unauthorized("Refresh token expired; log in again") from None
        raise Unauthorized("Invalid refresh token") from None
    if not raw or raw.get("type") != "refresh" or "sid" not in raw or "jti" not in raw:
        raise Unauthorized("Invalid refresh token")
    try:
        user_id = uuid.UUID(str(raw["sub"]))
    except ValueError:
        raise Unauthorized("Invalid refresh token") from None
    return RefreshClaims(
        user_id=user_id, session_id=str(raw["sid"]), jti=str(raw["jti"]), expires_at=int(raw["exp"])
    )


async def ensure_not_revoked(redis: Redis, claims: AccessClaims) -> None:
    """Refuse a token whose own id or whose session was revoked (one round trip)."""
    jti, sid = await redis.mget(REVOKED_JTI + claims.jti, REVOKED_SID + claims.session_id)
    if jti is not None or sid is not None:
        raise Unauthorized("This session has ended; log in again")


async def revoke_token(redis: Redis, claims: AccessClaims) -> None:
    """Denylist one access token until it would have expired anyway."""
    ttl = max(1, claims.expires_at - int(dt.datetime.now(dt.UTC).timestamp()) + 10)
    await redis.set(REVOKED_JTI + claims.jti, "1", ex=ttl)


async def revoke_sessions(redis: Redis, settings: Settings, session_ids: list[str]) -> None:
    """Denylist every access token of these sessions, for one access-token lifetime."""
    if not session_ids:
        return
    ttl = settings.access_token_ttl_seconds + 10
    async with redis.pipeline(transaction=False) as pipe:
        for sid in session_ids:
            pipe.set(REVOKED_SID + sid, "1", ex=ttl)
        await pipe.execute()
