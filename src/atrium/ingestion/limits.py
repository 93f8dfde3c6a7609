"""Upload limits: the one place that decides how large an upload may be.

Plans (billing) will make the limit depend on the tenant's plan; callers already pass what that
needs, so only this module changes then.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.config import Settings

#: Files accepted in one multipart request.
MAX_FILES_PER_REQUEST = 100


async def max_upload_bytes(session: AsyncSession, tenant_id: uuid.UUID, settings: Settings) -> int:
    """The largest document (file or JSON text, in bytes) the tenant may upload.

    Args:
        session: the request's session (for the tenant's plan).
        tenant_id: the uploading tenant.
        settings: the application settings (``max_upload_bytes`` caps every plan).
    """
    from atrium.billing.plans import Limit
    from atrium.billing.quota import limits_in_session

    plan_limit = (await limits_in_session(session, tenant_id))[Limit.max_upload_bytes]
    if plan_limit is None:
        return settings.max_upload_bytes
    return min(settings.max_upload_bytes, plan_limit)


def human_bytes(size: int) -> str:
    """``52428800`` → ``50 MB`` (binary units, as file managers show them)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
