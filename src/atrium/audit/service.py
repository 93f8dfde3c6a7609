"""Record audit events. Services call :func:`record`; it only adds to the session (no commit)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.models.audit import AuditEvent


def client_ip(request: Request | None) -> str | None:
    """The caller's address as the server saw it (proxy headers are uvicorn's job)."""
    if request is None or request.client is None:
        return None
    return request.client.host


def record(
    session: AsyncSession,
    action: str,
    *,
    request: Request | None = None,
    tenant_id: uuid.UUID | None = None,
    actor_user_id: uuid.UUID | None = None,
    actor_api_key_id: uuid.UUID | None = None,
    target_type: str | None = None,
    target_id: object | None = None,
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit event to the unit of work; it is stored when the session commits.

    Args:
        session: the unit of work (the event shares its fate: rolled back with it).
        action: dotted verb, e.g. ``auth.login.failed``, ``member.role_changed``.
        request: the HTTP request, for IP and user agent.
        tenant_id: the tenant concerned, if any.
        actor_user_id: the acting person, if any.
        actor_api_key_id: the acting API key, if any.
        target_type: kind of thing acted on (``user``, ``api_key``...).
        target_id: its id.
        data: small JSON details (never secrets).
    """
    ua = request.headers.get("user-agent") if request is not None else None
    event = AuditEvent(
        tenant_id=tenant_id,
        actor_user_id=actor_user_id,
        actor_api_key_id=actor_api_key_id,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        ip=client_ip(request),
        user_agent=ua[:300] if ua else None,
        data=data or {},
    )
    session.add(event)
    return event
