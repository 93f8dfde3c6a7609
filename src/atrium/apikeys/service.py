"""The life of an API key: issue, create, rotate and revoke it (and every key of a creator).

Each change reaches requests in flight through the Redis record that authentication reads
(:mod:`atrium.apikeys.cache`): revocation and rotation overwrite a key's record before the
commit (fail closed), and a new key drops the "does not exist" markers of its HMAC once
committed. Who may manage which key is :mod:`atrium.apikeys.policy`; authenticating a key on
every request is :mod:`atrium.auth.api_keys`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.apikeys import repository
from atrium.apikeys.cache import forget_misses, publish_record
from atrium.apikeys.policy import (
    ensure_no_escalation,
    ensure_role_holds,
    ensure_within_plan,
    lock_creator_role,
    scopes_beyond,
)
from atrium.apikeys.schemas import ApiKeyCreate, ApiKeyRotate, ApiKeyStatus
from atrium.apikeys.secrets import current_secret, display_parts, generate_key, key_digest
from atrium.audit.service import record
from atrium.auth.permissions import Permission, Scope
from atrium.auth.subject import AuthSubject
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit.errors import Conflict, NotFound
from atrium.models import ApiKey, utcnow

log = structlog.get_logger("atrium.apikeys")


def key_status(key: ApiKey, now: dt.datetime | None = None) -> ApiKeyStatus:
    """Whether ``key`` works at ``now``."""
    now = now or utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return ApiKeyStatus.revoked
    if key.expires_at is not None and key.expires_at <= now:
        return ApiKeyStatus.expired
    if key.revoked_at is not None:
        return ApiKeyStatus.rotating
    return ApiKeyStatus.active


async def issue_key(
    session: AsyncSession,
    settings: Settings,
    tenant_id: uuid.UUID,
    *,
    name: str,
    scopes: list[Scope] | list[str],
    expires_at: dt.datetime | None = None,
    rate_limit_per_minute: int | None = None,
    created_by_user_id: uuid.UUID | None = None,
    created_by_api_key_id: uuid.UUID | None = None,
    rotated_from_id: uuid.UUID | None = None,
) -> tuple[ApiKey, str]:
    """Create a key row (flushed, not committed) and return it with its secret.

    No validation and no audit: routes go through :func:`create_key`; tests and scripts may call
    this directly (e.g. for an already expired key).
    """
    secret = generate_key()
    prefix, last_four = display_parts(secret)
    key = ApiKey(
        tenant_id=tenant_id,
        name=name,
        key_hash=key_digest(current_secret(settings), secret),
        prefix=prefix,
        last_four=last_four,
        scopes=[Scope(s).value for s in scopes],
        expires_at=expires_at,
        rate_limit_per_minute=rate_limit_per_minute,
        created_by_user_id=created_by_user_id,
        created_by_api_key_id=created_by_api_key_id,
        rotated_from_id=rotated_from_id,
    )
    repository.add(session, key)
    await session.flush()
    return key, secret


def _actor(subject: AuthSubject) -> dict[str, Any]:
    if subject.kind == "api_key":
        return {"actor_api_key_id": subject.api_key_id}
    return {"actor_user_id": subject.user_id}


async def create_key(
    ctx: ServiceContext, subject: AuthSubject, data: ApiKeyCreate
) -> tuple[ApiKey, str]:
    """Create a key for the subject's tenant and audit it; the secret is returned once.

    Raises:
        Forbidden: the key would have scopes the caller (or, for a key, its creator's current
            role) does not hold.
        NotFound: the caller stopped being a member after the request was authorized.
        Unauthorized: the calling key's creator stopped being a member meanwhile.
        Unprocessable: the rate limit is above the plan's.
    """
    session = ctx.session
    ensure_no_escalation(subject, data.scopes, "create")
    ensure_role_holds(subject, await lock_creator_role(session, subject), data.scopes, "create")
    await ensure_within_plan(session, subject.tenant_id, data.rate_limit_per_minute)
    key, secret = await issue_key(
        session,
        ctx.settings,
        subject.tenant_id,
        name=data.name,
        scopes=data.scopes,
        expires_at=data.expires_at,
        rate_limit_per_minute=data.rate_limit_per_minute,
        created_by_user_id=subject.user_id,
        created_by_api_key_id=subject.api_key_id,
    )
    await forget_misses(session, ctx.redis, key)
    record(
        session,
        "api_key.created",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=key.id,
        data={"name": key.name, "prefix": key.prefix, "scopes": key.scopes},
        **_actor(subject),
    )
    return key, secret


async def _get_or_404(session: AsyncSession, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    key = await repository.ApiKeyRepository(session, tenant_id).get(key_id, for_update=True)
    if key is None:
        raise NotFound("API key not found")
    return key


async def revoke_key(ctx: ServiceContext, subject: AuthSubject, key_id: uuid.UUID) -> None:
    """Revoke a key now (also one still in a rotation grace period). Idempotent.

    Raises:
        NotFound: no such key in this tenant.
        Forbidden: the key has scopes the caller does not hold.
    """
    session = ctx.session
    key = await _get_or_404(session, subject.tenant_id, key_id)
    ensure_no_escalation(subject, key.scopes, "revoke")
    now = utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        return
    key.revoked_at = now
    await session.flush()
    record(
        session,
        "api_key.revoked",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=key.id,
        data={"name": key.name, "prefix": key.prefix},
        **_actor(subject),
    )
    # Written before the commit on purpose: if the commit failed the key would be refused for a
    # few minutes though not revoked (fail closed), never accepted though revoked.
    await publish_record(ctx.redis, key)


async def rotate_key(
    ctx: ServiceContext, subject: AuthSubject, key_id: uuid.UUID, data: ApiKeyRotate
) -> tuple[ApiKey, str]:
    """Issue a new secret with the same name, scopes, expiry and limit; revoke the old key
    now, or once ``grace_period_seconds`` have passed.

    Raises:
        NotFound: no such key in this tenant, or the caller stopped being a member.
        Forbidden: the key has scopes the caller (or, for a key, its creator's current role)
            does not hold (rotating it would hand the caller a secret with them).
        Conflict: the key is revoked, expired or already rotated.
        Unauthorized: the calling key's creator stopped being a member meanwhile.
    """
    session = ctx.session
    # The membership before the key: removal and role changes lock in the same order.
    role = await lock_creator_role(session, subject)
    old = await _get_or_404(session, subject.tenant_id, key_id)
    ensure_no_escalation(subject, old.scopes, "rotate")
    ensure_role_holds(subject, role, old.scopes, "rotate")
    now = utcnow()
    status = key_status(old, now)
    if status is not ApiKeyStatus.active:
        hint = {
            ApiKeyStatus.rotating: "it was already rotated; rotate its replacement instead",
            ApiKeyStatus.revoked: "it is revoked; create a new key instead",
            ApiKeyStatus.expired: "it has expired; create a new key instead",
        }[status]
        raise Conflict(f"This API key cannot be rotated: {hint}")
    new, secret = await issue_key(
        session,
        ctx.settings,
        subject.tenant_id,
        name=old.name,
        scopes=list(old.scopes),
        expires_at=old.expires_at,
        rate_limit_per_minute=old.rate_limit_per_minute,
        created_by_user_id=subject.user_id,
        created_by_api_key_id=subject.api_key_id,
        rotated_from_id=old.id,
    )
    await forget_misses(session, ctx.redis, new)
    old.revoked_at = now + dt.timedelta(seconds=data.grace_period_seconds)
    await session.flush()
    record(
        session,
        "api_key.rotated",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        target_type="api_key",
        target_id=old.id,
        data={
            "name": old.name,
            "old_prefix": old.prefix,
            "new_key_id": str(new.id),
            "new_prefix": new.prefix,
            "grace_period_seconds": data.grace_period_seconds,
        },
        **_actor(subject),
    )
    await publish_record(ctx.redis, old)
    return new, secret


async def revoke_keys_created_by(
    ctx: ServiceContext,
    user_id: uuid.UUID,
    *,
    reason: str,
    tenant_id: uuid.UUID | None = None,
    actor_user_id: uuid.UUID | None = None,
    within: frozenset[Permission] | None = None,
) -> list[ApiKey]:
    """Revoke, now, every working key ``user_id`` created: in ``tenant_id``, or everywhere.

    Called when a member is removed or leaves (one tenant) and when an account is deleted (every
    tenant): a key must not outlive its creator's access; and, with ``within``, when a member's
    role is lowered: a key must not grant more than its creator's role. Keys a key minted carry
    the same creator, so they go too; a key an admin rotated is the admin's. Each key gets an
    ``api_key.revoked`` audit event with ``reason``, and its cached record is overwritten, so it
    is refused from the next request on, on every replica.

    Args:
        ctx: the unit of work (flushed, not committed), Redis (where the key records are
            cached) and the origin for the audit log.
        user_id: the creator.
        reason: why, for the audit log: ``member_removed``, ``member_left``, ``account_deleted``,
            ``role_lowered``.
        tenant_id: only this tenant's keys; None: every tenant's.
        actor_user_id: who caused it (the admin who removed the member, or the user).
        within: only the keys with a scope that grants something outside these permissions
            (the creator's new role); None: every key.

    Returns:
        The keys revoked.
    """
    session = ctx.session
    now = utcnow()
    keys = list(
        await repository.live_keys_created_by(session, user_id, now=now, tenant_id=tenant_id)
    )
    if within is not None:
        keys = [k for k in keys if scopes_beyond(k.scopes, within)]
    for key in keys:
        key.revoked_at = now
    await session.flush()
    for key in keys:
        record(
            session,
            "api_key.revoked",
            origin=ctx.origin,
            tenant_id=key.tenant_id,
            actor_user_id=actor_user_id,
            target_type="api_key",
            target_id=key.id,
            data={
                "name": key.name,
                "prefix": key.prefix,
                "reason": reason,
                "created_by_user_id": str(user_id),
            },
        )
        # Before the commit, like revoke_key: a failed commit leaves the key refused for a few
        # minutes (fail closed), never accepted after its creator lost access.
        await publish_record(ctx.redis, key)
    if keys:
        log.info(
            "api_keys_revoked_with_creator", user_id=str(user_id), count=len(keys), reason=reason
        )
    return keys
