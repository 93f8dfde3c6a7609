"""Invitations: bound to one address, valid 7 days, single use; only a hash of the token is kept.

The token travels only in the mail. Accepting needs the token *and* an account for the invited
address: either the signed-in user's own address, or a new account created for that address
(which counts as verified, since the invitation mail reached it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts.manager import link, send_mail
from atrium.audit.service import record
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Metric
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit import ratelimit
from atrium.kit.email import display_name
from atrium.kit.errors import Conflict, Forbidden, Gone, NotFound
from atrium.models import Invitation, Membership, Role, Tenant, User, utcnow
from atrium.tenants import repository, schemas
from atrium.tenants.repository import InvitationRepository, MembershipRepository
from atrium.tenants.status import ensure_tenant_usable

INVITATION_TTL = dt.timedelta(days=7)

#: Invitation mail is mail to an address of the inviter's choosing: without limits a tenant
#: (free to create) could make Atrium's domain send unwanted mail. (times, seconds) per bucket.
PER_INVITATION_LIMITS = ((3, 3600), (5, 24 * 3600))  # one invitation: created, then resent
PER_RECIPIENT_LIMITS = ((5, 3600), (10, 24 * 3600))  # one address, from every tenant together
PER_TENANT_LIMITS = ((30, 3600), (100, 24 * 3600))  # every invitation mail of one tenant


def hash_token(token: str) -> str:
    """The stored form of an invitation token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _status(inv: Invitation, now: dt.datetime) -> schemas.InvitationStatus:
    if inv.accepted_at is not None:
        return schemas.InvitationStatus.accepted
    if inv.expires_at <= now:
        return schemas.InvitationStatus.expired
    return schemas.InvitationStatus.pending


def to_schema(inv: Invitation, now: dt.datetime | None = None) -> schemas.Invitation:
    """The response form of an invitation (never its token)."""
    return schemas.Invitation(
        id=inv.id,
        tenant_id=inv.tenant_id,
        email=inv.email,
        role=inv.role,
        status=_status(inv, now or utcnow()),
        invited_by_user_id=inv.invited_by_user_id,
        expires_at=inv.expires_at,
        accepted_at=inv.accepted_at,
        created_at=inv.created_at,
    )


def to_schemas(rows: Sequence[Any]) -> list[schemas.Invitation]:
    """Response items for a page of invitations."""
    now = utcnow()
    return [to_schema(inv, now) for inv in rows]


def list_query(session: AsyncSession, tenant_id: uuid.UUID) -> Select[tuple[Invitation]]:
    """The tenant's invitations, newest first."""
    return InvitationRepository(session, tenant_id).list_query()


async def check_send_limits(
    ctx: ServiceContext, tenant_id: uuid.UUID, email: str, invitation_id: uuid.UUID
) -> None:
    """Count one invitation mail against its invitation, its recipient and its tenant.

    Raises:
        TooManyRequests: one of the limits is spent (``Retry-After`` says for how long).
    """
    redis = ctx.redis
    recipient = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    buckets = [
        (
            f"atrium:t:{tenant_id}:rl:invitation:{invitation_id}",
            "invitation",
            PER_INVITATION_LIMITS,
        ),
        (
            f"atrium:rl:invitation-recipient:{recipient}",
            "invitation-recipient",
            PER_RECIPIENT_LIMITS,
        ),
        (f"atrium:t:{tenant_id}:rl:invitation-tenant", "invitation-tenant", PER_TENANT_LIMITS),
    ]
    for key, name, limits in buckets:
        for times, seconds in limits:
            bucket = ratelimit.Bucket(f"{key}:{seconds}", times, seconds, name)
            state = await ratelimit.hit(redis, bucket)
            ctx.rate_limits.append(state)
            ratelimit.raise_if_refused(state)


async def _send(
    session: AsyncSession,
    settings: Settings,
    inv: Invitation,
    token: str,
    tenant: Tenant,
    inviter: User | None,
) -> None:
    send_mail(
        session,
        "invitation",
        inv.email,
        {
            # Chosen by the inviter and quoted to someone else: bounded and defanged.
            "tenant_name": display_name(tenant.name),
            "inviter": display_name(inviter.name or inviter.email) if inviter else "A colleague",
            "role": inv.role.value,
            "link": link(settings, "/invitations/accept", token=token),
            "days": INVITATION_TTL.days,
        },
    )


async def create(
    ctx: ServiceContext, subject: AuthSubject, body: schemas.InvitationCreate
) -> Invitation:
    """Invite ``body.email`` into the subject's tenant and mail the link.

    Raises:
        Conflict: the address already belongs to a member, or has a pending invitation.
        TooManyRequests: the address or the tenant had too much invitation mail lately.
    """
    session = ctx.session
    email = body.email
    if await MembershipRepository(session, subject.tenant_id).has_email(email):
        raise Conflict(f"{email} is already a member of this tenant")
    now = utcnow()
    pending = await InvitationRepository(session, subject.tenant_id).pending_id(email, now)
    if pending is not None:
        raise Conflict(
            f"{email} already has a pending invitation; resend it with "
            f"POST /v1/tenants/{subject.tenant_id}/invitations/{pending}/resend",
            detail={"message": f"{email} already has a pending invitation", "id": str(pending)},
        )
    invitation_id = uuid.uuid4()
    await check_send_limits(ctx, subject.tenant_id, email, invitation_id)
    token = secrets.token_urlsafe(32)
    inv = Invitation(
        id=invitation_id,
        tenant_id=subject.tenant_id,
        email=email,
        role=Role(body.role.value),
        token_hash=hash_token(token),
        invited_by_user_id=subject.user_id,
        expires_at=now + INVITATION_TTL,
    )
    session.add(inv)
    await session.flush()
    tenant = await repository.get_tenant(session, subject.tenant_id)
    inviter = await repository.get_user(session, subject.user_id) if subject.user_id else None
    assert tenant is not None
    await _send(session, ctx.settings, inv, token, tenant, inviter)
    record(
        session,
        "invitation.created",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="invitation",
        target_id=inv.id,
        data={"email": email, "role": inv.role.value},
    )
    return inv


async def _get(session: AsyncSession, tenant_id: uuid.UUID, invitation_id: uuid.UUID) -> Invitation:
    inv = await InvitationRepository(session, tenant_id).get(invitation_id)
    if inv is None:
        raise NotFound("Invitation not found")
    return inv


async def revoke(ctx: ServiceContext, subject: AuthSubject, invitation_id: uuid.UUID) -> None:
    """Withdraw an invitation (its link stops working).

    Raises:
        NotFound: no such invitation in this tenant.
        Conflict: it was already accepted.
    """
    session = ctx.session
    inv = await _get(session, subject.tenant_id, invitation_id)
    if inv.accepted_at is not None:
        raise Conflict("This invitation was already accepted; remove the member instead")
    await session.delete(inv)
    await session.flush()
    record(
        session,
        "invitation.revoked",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="invitation",
        target_id=invitation_id,
        data={"email": inv.email},
    )


async def resend(ctx: ServiceContext, subject: AuthSubject, invitation_id: uuid.UUID) -> Invitation:
    """Mail a fresh link (the old one stops working) valid for another 7 days.

    Raises:
        NotFound: no such invitation in this tenant.
        Conflict: it was already accepted.
        TooManyRequests: this invitation, its address or the tenant had too much mail lately.
    """
    session = ctx.session
    inv = await _get(session, subject.tenant_id, invitation_id)
    if inv.accepted_at is not None:
        raise Conflict("This invitation was already accepted")
    await check_send_limits(ctx, subject.tenant_id, inv.email, inv.id)
    token = secrets.token_urlsafe(32)
    inv.token_hash = hash_token(token)
    inv.expires_at = utcnow() + INVITATION_TTL
    await session.flush()
    tenant = await repository.get_tenant(session, subject.tenant_id)
    inviter = await repository.get_user(session, subject.user_id) if subject.user_id else None
    assert tenant is not None
    await _send(session, ctx.settings, inv, token, tenant, inviter)
    record(
        session,
        "invitation.resent",
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        target_type="invitation",
        target_id=inv.id,
        data={"email": inv.email},
    )
    return inv


async def find_usable(session: AsyncSession, token: str) -> tuple[Invitation, Tenant]:
    """The invitation of ``token`` if it can still be accepted.

    Raises:
        NotFound: no invitation has this token (wrong, withdrawn or replaced by a resend).
        Gone: it was already used, or expired.
        Forbidden: its tenant is suspended.
    """
    inv = await repository.invitation_by_token(session, hash_token(token))
    if inv is None:
        raise NotFound(
            "This invitation link is not valid: it may have been withdrawn or replaced by a "
            "newer one"
        )
    if inv.accepted_at is not None:
        raise Gone("This invitation was already used")
    if inv.expires_at <= utcnow():
        raise Gone("This invitation has expired; ask for a new one")
    tenant = await repository.get_tenant(session, inv.tenant_id)
    if tenant is None:
        raise NotFound("This invitation's tenant no longer exists")
    ensure_tenant_usable(tenant.status)
    return inv, tenant


async def accept(ctx: ServiceContext, inv: Invitation, tenant: Tenant, user: User) -> Role:
    """Make ``user`` a member as the invitation says; it is then spent.

    Raises:
        Forbidden: the invitation was sent to another address.
    """
    if user.email.strip().lower() != inv.email:
        raise Forbidden(
            "This invitation was sent to another e-mail address; sign in with that address "
            "to accept it"
        )
    session = ctx.session
    existing = await MembershipRepository(session, tenant.id).find(user.id)
    role = inv.role
    if existing is None:
        # A seat is a plan limit: held before joining (402 when the plan is full), then counted.

        async with ctx.reserve(tenant.id, Metric.members, 1):
            session.add(Membership(tenant_id=tenant.id, user_id=user.id, role=role))
            await session.flush()
    else:
        role = existing.role  # already a member: keep the role they have
    inv.accepted_at = utcnow()
    inv.accepted_by_user_id = user.id
    await session.flush()
    record(
        session,
        "invitation.accepted",
        origin=ctx.origin,
        tenant_id=tenant.id,
        actor_user_id=user.id,
        target_type="invitation",
        target_id=inv.id,
        data={"email": inv.email, "role": role.value},
    )
    return role
