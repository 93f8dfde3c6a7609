"""Tenants and their members. Every function takes the tenant id it acts in; nothing commits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.apikeys.service import revoke_keys_created_by
from atrium.audit.service import Origin, record
from atrium.auth.permissions import Permission, permissions_for_role
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Metric
from atrium.context import ServiceContext
from atrium.kit.enqueue import enqueue
from atrium.kit.errors import Conflict, Forbidden, NotFound, Unprocessable
from atrium.models import AuditEvent, Membership, Role, Tenant, TenantStatus, User
from atrium.tenants import repository, schemas
from atrium.tenants.repository import MembershipRepository
from atrium.tenants.status import forget_status

PURGE_TASK = "atrium.tenants.purge"


async def create_tenant(
    session: AsyncSession,
    owner: User,
    name: str,
    *,
    origin: Origin,
    max_owned: int | None = None,
) -> Tenant:
    """Create a tenant owned by ``owner``.

    Its vector partition is not created here: the first ingestion creates it
    (:func:`atrium.ingestion.vectorstore.replace_document_chunks`), and a search of a tenant
    without one finds nothing. An account that never uploads costs no PostgreSQL table.

    Args:
        session: the request's unit of work.
        owner: the new tenant's owner.
        name: its name.
        origin: for the audit event.
        max_owned: the most tenants ``owner`` may own (those being deleted not counted);
            None: no cap (sign-up's first tenant).

    Raises:
        Conflict: ``owner`` already owns ``max_owned`` tenants.
    """
    if max_owned is not None:
        owned = await repository.count_owned_tenants(session, owner.id, lock=True)
        if owned >= max_owned:
            message = (
                f"You already own {owned} tenants, the most one account may own "
                f"({max_owned}); delete one you no longer need, or ask to be invited instead"
            )
            raise Conflict(message, detail={"message": message, "owned": owned, "limit": max_owned})
    tenant = Tenant(id=uuid.uuid4(), name=name, status=TenantStatus.active)
    session.add(tenant)
    await session.flush()
    session.add(Membership(tenant_id=tenant.id, user_id=owner.id, role=Role.owner))
    await session.flush()
    await session.refresh(tenant)  # the stored timestamps (MySQL keeps whole seconds)
    record(
        session,
        "tenant.created",
        origin=origin,
        tenant_id=tenant.id,
        actor_user_id=owner.id,
        target_type="tenant",
        target_id=tenant.id,
        data={"name": name},
    )
    return tenant


def user_tenants_query(user_id: uuid.UUID) -> Select[tuple[Tenant, Role]]:
    """The tenants ``user_id`` belongs to (not those being deleted), with their role."""
    return repository.user_tenants_query(user_id)


def with_role(rows: Sequence[Any]) -> list[schemas.TenantWithRole]:
    """Turn ``(Tenant, Role)`` rows into response items."""
    return [
        schemas.TenantWithRole(
            id=t.id, name=t.name, status=t.status, plan=t.plan, created_at=t.created_at, role=r
        )
        for t, r in rows
    ]


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    """The tenant (the caller's access was already checked by ``require``).

    Raises:
        NotFound: when it does not exist (or is being deleted).
    """
    tenant = await repository.get_tenant(session, tenant_id)
    if tenant is None or tenant.status is TenantStatus.deleting:
        raise NotFound("Tenant not found")
    return tenant


async def update_tenant(
    ctx: ServiceContext, subject: AuthSubject, update: schemas.TenantUpdate
) -> Tenant:
    """Rename the subject's tenant."""
    tenant = await get_tenant(ctx.session, subject.tenant_id)
    old = tenant.name
    tenant.name = update.name
    await ctx.session.flush()
    record(
        ctx.session,
        "tenant.updated",
        origin=ctx.origin,
        tenant_id=tenant.id,
        actor_user_id=subject.user_id,
        target_type="tenant",
        target_id=tenant.id,
        data={"name": {"from": old, "to": update.name}},
    )
    return tenant


async def schedule_purge(
    ctx: ServiceContext, tenant: Tenant, *, actor_user_id: uuid.UUID | None, reason: str
) -> None:
    """Mark ``tenant`` as being deleted and enqueue its purge (after commit).

    From this moment its members and keys get 404; the worker drops its vector partition,
    stored files and cache keys, then the row (every tenant-owned table cascades).
    """
    session = ctx.session
    tenant.status = TenantStatus.deleting
    await session.flush()
    await forget_status(ctx.redis, tenant.id)
    record(
        session,
        "tenant.deletion_requested",
        origin=ctx.origin,
        actor_user_id=actor_user_id,
        target_type="tenant",
        target_id=tenant.id,
        data={"name": tenant.name, "reason": reason},
    )
    enqueue(session, PURGE_TASK, tenant_id=str(tenant.id))


# Members -----------------------------------------------------------------------------------


def members_query(session: AsyncSession, tenant_id: uuid.UUID) -> Select[tuple[Membership, User]]:
    """The tenant's members, owners first."""
    return MembershipRepository(session, tenant_id).list_query()


def to_members(rows: Sequence[Any]) -> list[schemas.Member]:
    """Turn ``(Membership, User)`` rows into response items."""
    return [
        schemas.Member(
            user_id=u.id, email=u.email, name=u.name, role=m.role, joined_at=m.created_at
        )
        for m, u in rows
    ]


async def _membership(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, *, lock: bool = False
) -> Membership:
    # With ``lock``: locked for update before anything else, see MembershipRepository.lock
    # (the key creation and rotation that share-lock the same row).
    members = MembershipRepository(session, tenant_id)
    m = await (members.lock(user_id) if lock else members.find(user_id))
    if m is None:
        raise NotFound("This user is not a member of the tenant")
    return m


async def _owner_count(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    return await MembershipRepository(session, tenant_id).owner_count()


async def _member_out(session: AsyncSession, m: Membership) -> schemas.Member:
    user = await repository.get_user(session, m.user_id)
    assert user is not None
    return schemas.Member(
        user_id=user.id, email=user.email, name=user.name, role=m.role, joined_at=m.created_at
    )


async def change_role(
    ctx: ServiceContext, subject: AuthSubject, user_id: uuid.UUID, role: schemas.AssignableRole
) -> schemas.Member:
    """Give a member another role.

    A lowered role takes with it the API keys the member created whose scopes the new role
    does not hold (revoked at once, audited with ``reason: role_lowered``).

    Raises:
        NotFound: the user is not a member.
        Forbidden: an admin tried to change an owner.
        Conflict: it would leave the tenant without an owner.
    """
    session = ctx.session
    m = await _membership(session, subject.tenant_id, user_id, lock=True)
    new_role = Role(role.value)
    if m.role is Role.owner:
        if subject.role is not Role.owner:
            raise Forbidden("Only an owner can change an owner's role")
        if await _owner_count(session, subject.tenant_id) <= 1:
            raise Conflict(
                "The tenant would have no owner; transfer ownership to another member first"
            )
    old = m.role
    if old is not new_role:
        m.role = new_role
        await session.flush()
        record(
            session,
            "member.role_changed",
            origin=ctx.origin,
            tenant_id=subject.tenant_id,
            actor_user_id=subject.user_id,
            target_type="user",
            target_id=user_id,
            data={"from": old.value, "to": new_role.value},
        )
        await _revoke_their_keys(
            ctx,
            subject.tenant_id,
            user_id,
            reason="role_lowered",
            actor_user_id=subject.user_id,
            within=permissions_for_role(new_role),
        )
    return await _member_out(session, m)


async def _revoke_their_keys(
    ctx: ServiceContext,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    reason: str,
    actor_user_id: uuid.UUID | None,
    within: frozenset[Permission] | None = None,
) -> None:
    # A departing member's keys must not outlive their access, nor a demoted member's keys
    # grant more than their new role (``within``): revoked (and audited) at once.
    await revoke_keys_created_by(
        ctx,
        user_id,
        tenant_id=tenant_id,
        reason=reason,
        actor_user_id=actor_user_id,
        within=within,
    )


async def _free_seat(ctx: ServiceContext, tenant_id: uuid.UUID) -> None:
    # Members are metered by billing (a plan limit); a departure gives the seat back.
    await ctx.adjust(tenant_id, Metric.members, -1)


async def remove_member(ctx: ServiceContext, subject: AuthSubject, user_id: uuid.UUID) -> None:
    """Remove a member from the tenant and revoke every API key they created in it.

    Raises:
        NotFound: the user is not a member.
        Forbidden: an admin tried to remove an owner.
        Conflict: it would leave the tenant without an owner.
    """
    session = ctx.session
    m = await _membership(session, subject.tenant_id, user_id, lock=True)
    if m.role is Role.owner:
        if subject.role is not Role.owner:
            raise Forbidden("Only an owner can remove an owner")
        if await _owner_count(session, subject.tenant_id) <= 1:
            raise Conflict(
                "The tenant would have no owner; transfer ownership first or delete the tenant"
            )
    await session.delete(m)
    await session.flush()
    await _free_seat(ctx, subject.tenant_id)
    await _revoke_their_keys(
        ctx,
        subject.tenant_id,
        user_id,
        reason="member_removed",
        actor_user_id=subject.user_id,
    )
    record(
        session,
        "member.removed",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="user",
        target_id=user_id,
        data={"role": m.role.value},
    )


async def leave(ctx: ServiceContext, subject: AuthSubject) -> None:
    """The caller leaves the tenant; every API key they created in it is revoked.

    Raises:
        Conflict: the caller is its only owner.
    """
    assert subject.user_id is not None
    session = ctx.session
    m = await _membership(session, subject.tenant_id, subject.user_id, lock=True)
    if m.role is Role.owner and await _owner_count(session, subject.tenant_id) <= 1:
        raise Conflict(
            "You are the only owner: transfer ownership to another member or delete the "
            "tenant before leaving"
        )
    await session.delete(m)
    await session.flush()
    await _free_seat(ctx, subject.tenant_id)
    await _revoke_their_keys(
        ctx,
        subject.tenant_id,
        subject.user_id,
        reason="member_left",
        actor_user_id=subject.user_id,
    )
    record(
        session,
        "member.left",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="user",
        target_id=subject.user_id,
    )


async def transfer_ownership(
    ctx: ServiceContext, subject: AuthSubject, user_id: uuid.UUID
) -> list[schemas.Member]:
    """Make ``user_id`` an owner; the caller becomes an admin.

    The new owner must have room under the cap on owned tenants (``max_tenants_per_user``),
    the cap sign-up and ``POST /v1/tenants`` obey: otherwise a user could create tenants up to
    the cap, hand each one to another account and create more, without limit.

    Raises:
        NotFound: the user is not a member.
        Unprocessable: the caller named themselves.
        Conflict: the user already owns as many tenants as one account may.
    """
    assert subject.user_id is not None
    if user_id == subject.user_id:
        raise Unprocessable("You already own this tenant; name another member")
    session = ctx.session
    current = await MembershipRepository(session, subject.tenant_id).find(user_id)
    if current is not None and current.role is not Role.owner:
        # Counted under the lock create_tenant takes (the user's row, then a locking read of
        # their memberships), so a transfer and the user's own creations queue up.
        max_owned = ctx.settings.max_tenants_per_user
        owned = await repository.count_owned_tenants(session, user_id, lock=True)
        if owned >= max_owned:
            message = (
                f"This member already owns {owned} tenants, the most one account may own "
                f"({max_owned}); they must delete or hand over one first, or stay a member "
                "here with another role"
            )
            raise Conflict(message, detail={"message": message, "owned": owned, "limit": max_owned})
    target = await _membership(session, subject.tenant_id, user_id, lock=True)
    me = await _membership(session, subject.tenant_id, subject.user_id, lock=True)
    old = target.role
    target.role = Role.owner
    me.role = Role.admin
    await session.flush()
    record(
        session,
        "tenant.ownership_transferred",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="user",
        target_id=user_id,
        data={"from_user_id": str(subject.user_id), "previous_role": old.value},
    )
    return [await _member_out(session, target), await _member_out(session, me)]


async def sole_owner_tenants(session: AsyncSession, user_id: uuid.UUID) -> list[tuple[Tenant, int]]:
    """Tenants whose only owner is ``user_id``, with how many other members each has."""
    out: list[tuple[Tenant, int]] = []
    for t in await repository.owned_tenants(session, user_id):
        roles = await MembershipRepository(session, t.id).roles_except(user_id)
        if roles.get(Role.owner, 0) == 0:
            out.append((t, sum(roles.values())))
    return out


# Audit log ---------------------------------------------------------------------------------


def audit_query(tenant_id: uuid.UUID) -> Select[tuple[AuditEvent]]:
    """The tenant's audit events, newest first."""
    return repository.audit_query(tenant_id)
