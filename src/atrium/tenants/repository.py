"""SQL of tenants, their members, invitations and audit log.

Members and invitations of one tenant go through :class:`MembershipRepository` and
:class:`InvitationRepository` (scoped by :class:`atrium.kit.repository.TenantRepository`).
The module functions are the queries that are not about one tenant's rows: a user's tenants
(across tenants, scoped to the user), a tenant row by its id (read, its status alone, deleted),
an invitation found by its token.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import Select, case, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.kit.repository import TenantRepository
from atrium.models import AuditEvent, Invitation, Membership, Role, Tenant, TenantStatus, User
from atrium.models.accounts import user_email_col, user_id_col

#: The order members are listed in: owners first.
_ROLE_RANK = {"owner": 0, "admin": 1, "member": 2, "viewer": 3}


class MembershipRepository(TenantRepository[Membership]):
    """The members of one tenant."""

    model = Membership

    async def find(self, user_id: uuid.UUID) -> Membership | None:
        """``user_id``'s membership (from the unit of work when it holds it already)."""
        return await self.session.get(Membership, (self.tenant_id, user_id))

    async def lock(self, user_id: uuid.UUID) -> Membership | None:
        """``user_id``'s membership, locked for update and read afresh.

        Removal, departure and role changes lock the row for update before anything else:
        API-key creation and rotation share-lock it (then the keys), so a key created by a
        request authorized just before the change is either seen and revoked by it, or
        refused after it (the locking read sees the latest committed row).
        """
        query = (
            self.select()
            .where(Membership.user_id == user_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return (await self.session.execute(query)).scalar_one_or_none()

    async def role_and_status(self, user_id: uuid.UUID) -> tuple[Role, TenantStatus] | None:
        """``user_id``'s role in the tenant and the tenant's status, in one read (a person's
        request is authorized with both); None when they are not a member."""
        row = (
            await self.session.execute(
                self.select(Membership.role, Tenant.status)
                .join(Tenant, Tenant.id == Membership.tenant_id)
                .where(Membership.user_id == user_id)
            )
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    async def owner_count(self) -> int:
        """How many owners the tenant has."""
        return await self.count(Membership.role == Role.owner)

    async def roles_except(self, user_id: uuid.UUID) -> dict[Role, int]:
        """How many members other than ``user_id`` hold each role."""
        rows = (
            await self.session.execute(
                self.select(Membership.role, func.count())
                .where(Membership.user_id != user_id)
                .group_by(Membership.role)
            )
        ).all()
        return {Role(role): int(n) for role, n in rows}

    async def has_email(self, email: str) -> bool:
        """Whether a member's address is ``email`` (lower case; compared in any case)."""
        n = await self.session.scalar(
            select(func.count())
            .select_from(Membership)
            .join(User, Membership.user_id == user_id_col)
            .where(self.scope, func.lower(user_email_col) == email)
        )
        return bool(n)

    def list_query(self) -> Select[tuple[Membership, User]]:
        """The tenant's members with their accounts, owners first."""
        rank = case(_ROLE_RANK, value=Membership.role, else_=4)
        query: Select[tuple[Membership, User]] = (
            self.select(Membership, User)
            .join(User, Membership.user_id == user_id_col)
            .order_by(rank, Membership.created_at, user_id_col)
        )
        return query


class InvitationRepository(TenantRepository[Invitation]):
    """The invitations of one tenant."""

    model = Invitation

    def list_query(self) -> Select[tuple[Invitation]]:
        """The tenant's invitations, newest first."""
        query: Select[tuple[Invitation]] = self.select().order_by(
            Invitation.created_at.desc(), Invitation.id
        )
        return query

    async def pending_id(self, email: str, now: dt.datetime) -> uuid.UUID | None:
        """The id of ``email``'s invitation that is neither accepted nor expired, if any."""
        pending: uuid.UUID | None = await self.session.scalar(
            self.select(Invitation.id).where(
                Invitation.email == email,
                Invitation.accepted_at.is_(None),
                Invitation.expires_at > now,
            )
        )
        return pending


async def invitation_by_token(session: AsyncSession, token_hash: str) -> Invitation | None:
    """The invitation whose token hashes to ``token_hash``, locked for update.

    The one invitation query of no tenant: the token is all an invited person has; its
    tenant comes from the row.
    """
    query = select(Invitation).where(Invitation.token_hash == token_hash).with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def get_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant row, whatever its status (from the unit of work when it holds it)."""
    return await session.get(Tenant, tenant_id)


async def tenant_status(session: AsyncSession, tenant_id: uuid.UUID) -> TenantStatus | None:
    """The tenant's status alone, or None when it does not exist (authentication asks)."""
    result = await session.execute(select(Tenant.status).where(Tenant.id == tenant_id))
    status: TenantStatus | None = result.scalar_one_or_none()
    return status


async def delete_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    """Delete the tenant's row (the purge's last step); how many rows went (0 or 1).

    A core ``DELETE``, not the ORM's: the database cascades every tenant-owned table (foreign
    keys ``ON DELETE CASCADE``) without loading a row.
    """
    result = await session.execute(delete(Tenant).where(Tenant.id == tenant_id))
    return int(getattr(result, "rowcount", 0) or 0)


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    """An account (a member's, an inviter's)."""
    return await session.get(User, user_id)


async def count_owned_tenants(
    session: AsyncSession, user_id: uuid.UUID, *, lock: bool = False
) -> int:
    """How many tenants ``user_id`` owns (not counting those being deleted).

    Args:
        session: the unit of work.
        user_id: the owner.
        lock: lock the user's row first and count with a locking read, so concurrent
            creations by the same user are counted one after the other (under MySQL's
            repeatable read a plain read would see the transaction's older snapshot).
    """
    if lock:
        await session.execute(select(user_id_col).where(user_id_col == user_id).with_for_update())
    query = (
        select(Membership.tenant_id)
        .join(Tenant, Tenant.id == Membership.tenant_id)
        .where(
            Membership.user_id == user_id,
            Membership.role == Role.owner,
            Tenant.status != TenantStatus.deleting,
        )
    )
    if lock:
        query = query.with_for_update(read=True)
    return len((await session.scalars(query)).all())


def user_tenants_query(user_id: uuid.UUID) -> Select[tuple[Tenant, Role]]:
    """The tenants ``user_id`` belongs to (not those being deleted), with their role."""
    return (
        select(Tenant, Membership.role)
        .join(Membership, Membership.tenant_id == Tenant.id)
        .where(Membership.user_id == user_id, Tenant.status != TenantStatus.deleting)
        .order_by(Tenant.created_at, Tenant.id)
    )


async def owned_tenants(session: AsyncSession, user_id: uuid.UUID) -> list[Tenant]:
    """The tenants ``user_id`` owns, not those being deleted."""
    owned = select(Membership.tenant_id).where(
        Membership.user_id == user_id, Membership.role == Role.owner
    )
    query = select(Tenant).where(Tenant.id.in_(owned), Tenant.status != TenantStatus.deleting)
    return list((await session.execute(query)).scalars())


def audit_query(tenant_id: uuid.UUID) -> Select[tuple[AuditEvent]]:
    """The tenant's audit events, newest first.

    A function, not a :class:`TenantRepository`: the log's ``tenant_id`` is nullable
    (account-level events have none), which the base's model protocol does not admit.
    """
    return (
        select(AuditEvent)
        .where(AuditEvent.tenant_id == tenant_id)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id)
    )
