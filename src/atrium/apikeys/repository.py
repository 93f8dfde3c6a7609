"""SQL for API keys. Every statement but the authentication lookup is scoped to a tenant
(:class:`ApiKeyRepository`, or the membership a key's creation checks), or (for an account's
deletion) to the user who created the keys."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.repository import TenantRepository
from atrium.models import ApiKey, Membership, Role


async def find_by_digests(session: AsyncSession, digests: Sequence[str]) -> ApiKey | None:
    """The key whose stored HMAC is one of ``digests`` (one per secret of the key ring).

    The one unscoped query: authentication learns the key's tenant from the key itself, then
    compares it with the path's tenant.
    """
    result = await session.execute(select(ApiKey).where(ApiKey.key_hash.in_(list(digests))))
    return result.scalars().first()


class ApiKeyRepository(TenantRepository[ApiKey]):
    """The API keys of one tenant (``get`` by id: the base's)."""

    model = ApiKey

    def list_query(self, *, include_revoked: bool, now: dt.datetime) -> Select[Any]:
        """The tenant's keys, newest first; revoked ones only when asked for."""
        query = self.select()
        if not include_revoked:
            query = query.where(or_(ApiKey.revoked_at.is_(None), ApiKey.revoked_at > now))
        return query.order_by(ApiKey.created_at.desc(), ApiKey.id)

    async def record_last_used(self, key_id: uuid.UUID, used_at: dt.datetime) -> bool:
        """Move ``last_used_at`` forward to ``used_at`` (never backwards); whether a row
        changed."""
        result = await self.session.execute(
            update(ApiKey)
            .where(
                self.scope,
                ApiKey.id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < used_at),
            )
            .values(last_used_at=used_at)
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


async def live_keys_created_by(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    now: dt.datetime,
    tenant_id: uuid.UUID | None = None,
) -> Sequence[ApiKey]:
    """The keys ``user_id`` created that still work or may again: not revoked (or rotating,
    whose grace period has not ended) and not expired; locked for update.

    Args:
        session: the unit of work.
        user_id: the creator (keys a key minted carry its creator's id too).
        now: the moment that decides "revoked" and "expired".
        tenant_id: only this tenant's keys; None: every tenant's (the account is being deleted).
    """
    query = select(ApiKey).where(
        ApiKey.created_by_user_id == user_id,
        or_(ApiKey.revoked_at.is_(None), ApiKey.revoked_at > now),
        or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
    )
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    result = await session.execute(query.order_by(ApiKey.created_at, ApiKey.id).with_for_update())
    return result.scalars().all()


async def lock_membership_role(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> Role | None:
    """The role ``user_id`` holds in ``tenant_id`` now (None: not a member), share-locked.

    A locking read sees the latest committed row, not the transaction's snapshot, and the lock
    holds until the transaction ends: a removal, departure or role change (which lock the same
    row for update first) waits for this transaction, or this one for it.
    """
    result = await session.execute(
        select(Membership.role)
        .where(Membership.tenant_id == tenant_id, Membership.user_id == user_id)
        .with_for_update(read=True)
    )
    role: Role | None = result.scalar_one_or_none()
    return role


def add(session: AsyncSession, key: ApiKey) -> None:
    """Stage a new key."""
    session.add(key)
