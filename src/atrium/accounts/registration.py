"""Signing up: a new account with its own tenant, or with the membership an invitation offers.

A sign-up with an address that already has an account answers exactly as a new one would and
mails the owner of the address instead, so sign-up tells nobody which addresses are registered.
Verifying the address afterwards is :mod:`atrium.accounts.addresses`; logging in is
:mod:`atrium.accounts.credentials`.
"""

from __future__ import annotations

import uuid

from fastapi_users import exceptions as fu_exc
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts.manager import UserManager, send_mail
from atrium.accounts.passwords import check_password, invalid_password, password_helper
from atrium.accounts.schemas import NewUser, UserCreate
from atrium.audit.service import record
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit.errors import Conflict, Forbidden
from atrium.models import Role, Tenant, TenantStatus, User, utcnow
from atrium.models.accounts import user_email_col, user_id_col
from atrium.tenants import invitations
from atrium.tenants import service as tenants
from atrium.tenants.schemas import TenantWithRole

#: The plan a new tenant starts on (the column's default).
DEFAULT_PLAN: str = Tenant.__table__.c.plan.default.arg


def _default_tenant_name(user: User) -> str:
    who = user.name or user.email.split("@", 1)[0]
    return f"{who}'s workspace"[:200]


async def register(
    ctx: ServiceContext, manager: UserManager, body: UserCreate
) -> tuple[User, TenantWithRole]:
    """Create an account, and its own tenant or the membership its invitation offers.

    An address that already has an account gets the same answer as a new one, so sign-up
    cannot tell anyone which addresses are registered; the owner of the address is told by
    mail instead (see :func:`_registered_again`).

    Raises:
        Unprocessable: the password breaks a rule.
        Conflict: with an invitation token, the invited address already has an account (only
            the holder of the invitation mail learns it), or two sign-ups raced.
        NotFound, Gone, Forbidden: the invitation token is unusable or for another address.
    """
    session = ctx.session
    check_password(body.password, body.email)
    invitation = None
    if body.invitation_token:
        invitation = await invitations.find_usable(session, body.invitation_token)
        if invitation[0].email != body.email:
            raise Forbidden(
                "This invitation was sent to another e-mail address; register with the "
                "address that received it"
            )
    try:
        user = await manager.create(
            NewUser(
                email=body.email,
                password=body.password,
                name=body.name,
                is_verified=invitation is not None,
            ),
            safe=False,
        )
    except fu_exc.UserAlreadyExists:
        if invitation is None:
            return await _registered_again(session, manager.settings, body)
        raise Conflict(
            "An account with this e-mail address already exists; log in, or reset the password "
            "if you forgot it"
        ) from None
    except IntegrityError:
        # Two sign-ups of one new address at the same moment: the later one learns nothing
        # about anybody else's address.
        raise Conflict("This address was just registered; log in, or reset the password") from None
    except fu_exc.InvalidPasswordException as exc:
        raise invalid_password(exc, "password") from None
    record(
        session,
        "user.registered",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"via_invitation": invitation is not None},
    )
    if invitation is not None:
        inv, tenant = invitation
        role = await invitations.accept(ctx, inv, tenant, user)
    else:
        tenant = await tenants.create_tenant(
            session, user, body.tenant_name or _default_tenant_name(user), origin=ctx.origin
        )
        role = Role.owner
        await manager.request_verify(user)
    out = TenantWithRole(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,
        plan=tenant.plan,
        created_at=tenant.created_at,
        role=role,
    )
    return user, out


async def _registered_again(
    session: AsyncSession, settings: Settings, body: UserCreate
) -> tuple[User, TenantWithRole]:
    """The answer to a sign-up with an address that already has an account.

    The response has the status and shape of a real sign-up (its ids are fresh and stored
    nowhere: nobody can log in without the account's own password anyway), and the password
    is hashed as a real sign-up would, so the time taken tells little either. Its timestamps
    are taken as a real sign-up's are: the user's when it is written, the tenant's after
    another write (here the notice's), so the tenant is a little younger than the user, as
    in a real answer. The owner of the address gets a mail pointing to log-in and password
    reset.
    """
    password_helper.hash(body.password)
    user = User(
        id=uuid.uuid4(),
        email=body.email,
        name=body.name,
        is_verified=False,
        is_superuser=False,
        created_at=utcnow(),
    )
    send_mail(
        session,
        "account_exists",
        body.email,
        {
            "login_link": f"{settings.resolved_public_url}/login",
            "reset_link": f"{settings.resolved_public_url}/forgot-password",
        },
    )
    await session.flush()
    tenant = TenantWithRole(
        id=uuid.uuid4(),
        name=body.tenant_name or _default_tenant_name(user),
        status=TenantStatus.active,
        plan=DEFAULT_PLAN,
        created_at=utcnow(),
        role=Role.owner,
    )
    return user, tenant


async def accept_invitation_as_new_user(
    ctx: ServiceContext, manager: UserManager, token: str, password: str, name: str
) -> tuple[User, TenantWithRole]:
    """Create the account of an invited address and join the tenant in one step."""
    session = ctx.session
    inv, tenant = await invitations.find_usable(session, token)
    check_password(password, inv.email)
    existing = await session.scalar(
        select(user_id_col).where(func.lower(user_email_col) == inv.email)
    )
    if existing is not None:
        # Only the holder of the invitation mail learns this: it was sent to that address.
        raise Conflict("You already have an account: log in, then accept the invitation")
    try:
        user = await manager.create(
            NewUser(email=inv.email, password=password, name=name, is_verified=True),
            safe=False,
        )
    except (fu_exc.UserAlreadyExists, IntegrityError):
        raise Conflict("You already have an account: log in, then accept the invitation") from None
    except fu_exc.InvalidPasswordException as exc:
        raise invalid_password(exc, "password") from None
    record(
        session,
        "user.registered",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"via_invitation": True},
    )
    role = await invitations.accept(ctx, inv, tenant, user)
    return user, TenantWithRole(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status,
        plan=tenant.plan,
        created_at=tenant.created_at,
        role=role,
    )
