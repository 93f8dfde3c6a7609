"""Tenant routes: tenants, members, ownership, invitations and the audit log."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status

from atrium.accounts import registration
from atrium.accounts.manager import UserManager, get_user_manager
from atrium.auth.dependencies import bearer_token, current_user, require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.auth.user_limits import LimitedUser, user_rate_limit
from atrium.context import Ctx
from atrium.kit.db import DBSession
from atrium.kit.errors import (
    BadRequest,
    Unauthorized,
)
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.ratelimit import rate_limit
from atrium.kit.ratelimit_identifiers import by_ip
from atrium.kit.responses import SIGNED_IN, TENANT, errors
from atrium.models import Role
from atrium.tenants import invitations, schemas, service

router = APIRouter()
PageParams = Annotated[Params, Depends()]


def _tenant(t: object) -> schemas.Tenant:
    return schemas.Tenant.model_validate(t)


# Tenants -----------------------------------------------------------------------------------


@router.get(
    "/tenants", tags=["tenants"], response_model=Page[schemas.TenantWithRole], responses=SIGNED_IN
)
async def list_tenants(
    principal: LimitedUser, session: DBSession, params: PageParams
) -> Page[schemas.TenantWithRole]:
    """The tenants the caller belongs to, with their role in each."""
    return await paginate_query(
        session, service.user_tenants_query(principal.user.id), params, service.with_role
    )


@router.post(
    "/tenants",
    tags=["tenants"],
    # Besides the cap on owned tenants: creating and deleting in a loop is refused too.
    dependencies=[Depends(user_rate_limit("tenant-create", 10, 3600))],
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.TenantWithRole,
    responses=SIGNED_IN | errors(409),
)
async def create_tenant(
    body: schemas.TenantCreate, principal: LimitedUser, ctx: Ctx
) -> schemas.TenantWithRole:
    """Create a tenant; the caller becomes its owner.

    One account may own at most ``ATRIUM_MAX_TENANTS_PER_USER`` tenants (409 beyond it) and
    create 10 per hour (429). The tenant's vector partition is created by its first upload.
    """
    tenant = await service.create_tenant(
        ctx.session,
        principal.user,
        body.name,
        origin=ctx.origin,
        max_owned=ctx.settings.max_tenants_per_user,
    )
    return schemas.TenantWithRole(**_tenant(tenant).model_dump(), role=Role.owner)


@router.get(
    "/tenants/{tenant_id}",
    tags=["tenants"],
    response_model=schemas.Tenant,
    responses=TENANT,
)
async def get_tenant(
    session: DBSession, subject: AuthSubject = Depends(require(Permission.tenant_read))
) -> schemas.Tenant:
    """One tenant."""
    return _tenant(await service.get_tenant(session, subject.tenant_id))


@router.patch(
    "/tenants/{tenant_id}",
    tags=["tenants"],
    response_model=schemas.Tenant,
    responses=TENANT,
)
async def update_tenant(
    body: schemas.TenantUpdate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.tenant_update)),
) -> schemas.Tenant:
    """Rename a tenant."""
    return _tenant(await service.update_tenant(ctx, subject, body))


@router.delete(
    "/tenants/{tenant_id}",
    tags=["tenants"],
    status_code=status.HTTP_202_ACCEPTED,
    responses=TENANT,
)
async def delete_tenant(
    ctx: Ctx, subject: AuthSubject = Depends(require(Permission.tenant_delete))
) -> dict[str, str]:
    """Delete a tenant: it disappears at once; its data is purged in the background."""
    tenant = await service.get_tenant(ctx.session, subject.tenant_id)
    await service.schedule_purge(
        ctx, tenant, actor_user_id=subject.user_id, reason="deleted by owner"
    )
    return {"detail": "The tenant is being deleted.", "id": str(tenant.id)}


# Members -----------------------------------------------------------------------------------


@router.get(
    "/tenants/{tenant_id}/members",
    tags=["members"],
    response_model=Page[schemas.Member],
    responses=TENANT,
)
async def list_members(
    session: DBSession,
    params: PageParams,
    subject: AuthSubject = Depends(require(Permission.members_read)),
) -> Page[schemas.Member]:
    """The tenant's members, owners first."""
    return await paginate_query(
        session, service.members_query(session, subject.tenant_id), params, service.to_members
    )


@router.patch(
    "/tenants/{tenant_id}/members/{user_id}",
    tags=["members"],
    response_model=schemas.Member,
    responses=TENANT | errors(409),
)
async def update_member(
    user_id: uuid.UUID,
    body: schemas.MemberUpdate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> schemas.Member:
    """Change a member's role (admin, member or viewer)."""
    return await service.change_role(ctx, subject, user_id, body.role)


@router.delete(
    "/tenants/{tenant_id}/members/{user_id}",
    tags=["members"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=TENANT | errors(409),
)
async def remove_member(
    user_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> Response:
    """Remove a member; they lose access at once."""
    await service.remove_member(ctx, subject, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{tenant_id}/leave",
    tags=["members"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=TENANT | errors(409),
)
async def leave_tenant(
    ctx: Ctx, subject: AuthSubject = Depends(require(Permission.tenant_read))
) -> Response:
    """Leave the tenant (its only owner must transfer ownership first)."""
    if subject.kind != "user":
        raise BadRequest("Only a person can leave a tenant; to remove an API key, revoke it")
    await service.leave(ctx, subject)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{tenant_id}/transfer-ownership",
    tags=["members"],
    response_model=list[schemas.Member],
    # 409: the new owner already owns the most tenants one account may own.
    responses=TENANT | errors(409),
)
async def transfer_ownership(
    body: schemas.OwnershipTransfer,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.ownership_transfer)),
) -> list[schemas.Member]:
    """Make another member the owner; the caller becomes an admin."""
    return await service.transfer_ownership(ctx, subject, body.user_id)


# Invitations -------------------------------------------------------------------------------


@router.post(
    "/tenants/{tenant_id}/invitations",
    tags=["invitations"],
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.Invitation,
    responses=TENANT | errors(409),
)
async def create_invitation(
    body: schemas.InvitationCreate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> schemas.Invitation:
    """Invite someone by e-mail; the link in the mail is valid 7 days and works once."""
    inv = await invitations.create(ctx, subject, body)
    return invitations.to_schema(inv)


@router.get(
    "/tenants/{tenant_id}/invitations",
    tags=["invitations"],
    response_model=Page[schemas.Invitation],
    responses=TENANT,
)
async def list_invitations(
    session: DBSession,
    params: PageParams,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> Page[schemas.Invitation]:
    """The tenant's invitations (pending, accepted and expired), newest first."""
    return await paginate_query(
        session, invitations.list_query(session, subject.tenant_id), params, invitations.to_schemas
    )


@router.delete(
    "/tenants/{tenant_id}/invitations/{invitation_id}",
    tags=["invitations"],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=TENANT | errors(409),
)
async def revoke_invitation(
    invitation_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> Response:
    """Withdraw an invitation; its link stops working."""
    await invitations.revoke(ctx, subject, invitation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{tenant_id}/invitations/{invitation_id}/resend",
    tags=["invitations"],
    response_model=schemas.Invitation,
    responses=TENANT | errors(409),
)
async def resend_invitation(
    invitation_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.members_manage)),
) -> schemas.Invitation:
    """Mail a fresh link (valid 7 more days); the previous link stops working."""
    inv = await invitations.resend(ctx, subject, invitation_id)
    return invitations.to_schema(inv)


@router.post(
    "/invitations/accept",
    tags=["invitations"],
    dependencies=[Depends(rate_limit("invitation-accept", 30, 3600, key=by_ip))],
    response_model=schemas.InvitationAccepted,
    responses=errors(401, 402, 403, 404, 409, 410, 429),
)
async def accept_invitation(
    body: schemas.InvitationAccept,
    request: Request,
    ctx: Ctx,
    manager: Annotated[UserManager, Depends(get_user_manager)],
) -> schemas.InvitationAccepted:
    """Accept an invitation with the token from its mail.

    Signed in (``Authorization: Bearer``), the caller joins if the invitation was sent to their
    address. Without an account, send ``password`` (and ``name``): an account is created for the
    invited address, verified, and joins the tenant; then log in.
    """
    session = ctx.session
    if bearer_token(request) is not None:
        principal = await current_user(request, session)
        inv, tenant = await invitations.find_usable(session, body.token)
        role = await invitations.accept(ctx, inv, tenant, principal.user)
        out = schemas.TenantWithRole(**_tenant(tenant).model_dump(), role=role)
        return schemas.InvitationAccepted(tenant=out, user_id=principal.user.id)
    if not body.password:
        raise Unauthorized(
            "Log in to accept this invitation, or send a password to create your account"
        )
    user, out = await registration.accept_invitation_as_new_user(
        ctx, manager, body.token, body.password, body.name
    )
    return schemas.InvitationAccepted(tenant=out, user_id=user.id)


# Audit log ---------------------------------------------------------------------------------


@router.get(
    "/tenants/{tenant_id}/audit-events",
    tags=["audit"],
    response_model=Page[schemas.AuditEvent],
    responses=TENANT,
)
async def list_audit_events(
    session: DBSession,
    params: PageParams,
    subject: AuthSubject = Depends(require(Permission.audit_read)),
) -> Page[schemas.AuditEvent]:
    """Who did what in the tenant, newest first (owners and admins)."""

    def transform(rows: Sequence[Any]) -> list[schemas.AuditEvent]:
        return [schemas.AuditEvent.model_validate(r) for r in rows]

    return await paginate_query(session, service.audit_query(subject.tenant_id), params, transform)
