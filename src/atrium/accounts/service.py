"""The account's end and its data: delete the account, or export what Atrium holds about it.

Deleting an account ends its sessions, revokes every API key it created, purges the tenants it
alone owned and removes its files (a task); an export is a ZIP built by a task
(:mod:`atrium.accounts.exports`). The rest of the account's life is in its own modules:
signing up (:mod:`~atrium.accounts.registration`), logging in and passwords
(:mod:`~atrium.accounts.credentials`), verifying and changing the address
(:mod:`~atrium.accounts.addresses`).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts import exports, sessions
from atrium.accounts.manager import send_mail
from atrium.accounts.passwords import check_current_password
from atrium.apikeys.service import revoke_keys_created_by
from atrium.audit.service import record
from atrium.config import Settings
from atrium.context import ServiceContext
from atrium.kit.enqueue import enqueue
from atrium.kit.errors import Conflict, NotFound
from atrium.models import DataExport, ExportStatus, User
from atrium.models.accounts import user_id_col
from atrium.tenants import service as tenants

EXPORT_TASK = "atrium.accounts.export"
PURGE_USER_FILES_TASK = "atrium.accounts.purge_user_files"


async def delete_account(ctx: ServiceContext, user: User, password: str) -> list[uuid.UUID]:
    """Delete the account; purge the tenants it alone owned. Returns the purged tenant ids.

    Every API key the user created, in any tenant, is revoked first (the database would only
    forget who created it: the key would keep working).

    Raises:
        Forbidden: the password is wrong.
        Conflict: the user is the only owner of tenants that have other members (named).
    """
    session = ctx.session
    check_current_password(user, password)
    owned = await tenants.sole_owner_tenants(session, user.id)
    blocked = sorted(t.name for t, others in owned if others > 0)
    if blocked:
        names = ", ".join(blocked)
        raise Conflict(
            f"You are the only owner of {names}, which other people use. Transfer ownership "
            "to another member, or remove the members, before deleting your account.",
            detail={
                "message": "Transfer ownership of these tenants before deleting your account",
                "tenants": blocked,
            },
        )
    purged: list[uuid.UUID] = []
    for tenant, _ in owned:
        await tenants.schedule_purge(ctx, tenant, actor_user_id=user.id, reason="account deleted")
        purged.append(tenant.id)
    await sessions.revoke(session, ctx.redis, ctx.settings, user.id)
    await revoke_keys_created_by(ctx, user.id, reason="account_deleted", actor_user_id=user.id)
    record(
        session,
        "user.deleted",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="user",
        target_id=user.id,
        data={"purged_tenants": [str(t) for t in purged]},
    )
    send_mail(session, "account_deleted", user.email, {"name": user.name or user.email})
    enqueue(session, PURGE_USER_FILES_TASK, user_id=str(user.id))
    # Core DELETE: the database cascades memberships, sessions and exports.
    await session.execute(delete(User).where(user_id_col == user.id))
    session.expunge(user)
    return purged


async def start_export(ctx: ServiceContext, user: User) -> DataExport:
    """Create an export and enqueue the job that builds it."""
    session = ctx.session
    export = DataExport(id=uuid.uuid4(), user_id=user.id, status=ExportStatus.pending)
    session.add(export)
    await session.flush()
    record(
        session,
        "user.export_requested",
        origin=ctx.origin,
        actor_user_id=user.id,
        target_type="export",
        target_id=export.id,
    )
    enqueue(session, EXPORT_TASK, export_id=str(export.id), user_id=str(user.id))
    return export


async def get_export(session: AsyncSession, user: User, export_id: uuid.UUID) -> DataExport:
    """One of the caller's exports.

    Raises:
        NotFound: no such export of theirs.
    """
    export = await session.get(DataExport, export_id)
    if export is None or export.user_id != user.id:
        raise NotFound("Export not found")
    return export


def describe_export(settings: Settings, export: DataExport) -> dict[str, Any]:
    """Response fields of an export, with a fresh signed link when it is ready."""
    url, expires_at = (None, None)
    if export.status is ExportStatus.ready:
        url, expires_at = exports.signed_url(settings, export.id)
    return {
        "id": export.id,
        "status": export.status,
        "created_at": export.created_at,
        "completed_at": export.completed_at,
        "size_bytes": export.size_bytes,
        "error": export.error,
        "download_url": url,
        "download_expires_at": expires_at,
    }
