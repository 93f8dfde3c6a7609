"""Account jobs: build a data export, remove a deleted user's files."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from atrium.accounts import exports
from atrium.accounts.manager import send_mail
from atrium.kit import runtime
from atrium.kit.blobstore import get_blobstore
from atrium.kit.db import unit_of_work
from atrium.models import DataExport, ExportStatus, User, utcnow
from atrium.worker import celery_app

log = structlog.get_logger("atrium.accounts.tasks")


async def run_export(export_id: uuid.UUID, user_id: uuid.UUID) -> dict[str, Any]:
    """Build the ZIP, store it, mark the export ready and mail the link (idempotent)."""
    res = await runtime.resources()
    async with unit_of_work(res.sessionmaker) as session:
        export = await session.get(DataExport, export_id)
        if export is None or export.user_id != user_id:
            return {"export_id": str(export_id), "status": "missing"}
        if export.status is ExportStatus.ready:
            return {"export_id": str(export_id), "status": "ready"}
        try:
            data = await exports.build_zip(session, user_id)
        except LookupError:
            return {"export_id": str(export_id), "status": "missing"}
    key = exports.blob_key(user_id, export_id)
    await get_blobstore(res.settings).put(key, data)
    async with unit_of_work(res.sessionmaker) as session:
        export = await session.get(DataExport, export_id)
        user = await session.get(User, user_id)
        if export is None or user is None:
            return {"export_id": str(export_id), "status": "missing"}
        export.status = ExportStatus.ready
        export.blob_key = key
        export.size_bytes = len(data)
        export.completed_at = utcnow()
        url, expires_at = exports.signed_url(res.settings, export_id)
        send_mail(
            session,
            "export_ready",
            user.email,
            {
                "name": user.name or user.email,
                "link": url,
                "expires_at": expires_at.strftime("%Y-%m-%d %H:%M UTC"),
                "size_kb": max(1, len(data) // 1024),
            },
        )
    log.info("export_ready", export_id=str(export_id), size=len(data))
    return {"export_id": str(export_id), "status": "ready", "size_bytes": len(data)}


async def _mark_failed(export_id: uuid.UUID, error: str) -> None:
    res = await runtime.resources()
    async with unit_of_work(res.sessionmaker) as session:
        export = await session.get(DataExport, export_id)
        if export is not None and export.status is ExportStatus.pending:
            export.status = ExportStatus.failed
            export.error = error[:500]
            export.completed_at = utcnow()


@celery_app.task(name="atrium.accounts.export", bind=True, max_retries=3)
def export_data(self: Any, *, export_id: str, user_id: str) -> dict[str, Any]:
    """Build a user's data export (retried; marked failed with a reason after the last try)."""
    eid, uid = uuid.UUID(export_id), uuid.UUID(user_id)
    try:
        return runtime.run(run_export(eid, uid))
    except Exception as exc:
        if self.request.retries >= self.max_retries:
            runtime.run(
                _mark_failed(eid, "The export could not be built; please request a new one.")
            )
            raise
        raise self.retry(exc=exc, countdown=10 * (self.request.retries + 1)) from exc


@celery_app.task(
    name="atrium.accounts.purge_user_files",
    autoretry_for=(OSError, ConnectionError),
    retry_backoff=True,
    max_retries=8,
)
def purge_user_files(*, user_id: str) -> int:
    """Delete a deleted user's stored exports."""

    async def _run() -> int:
        res = await runtime.resources()
        return await get_blobstore(res.settings).delete_prefix(
            exports.user_prefix(uuid.UUID(user_id))
        )

    return runtime.run(_run())
