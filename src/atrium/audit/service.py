"""Record audit events. Services call :func:`record`; it only adds to the session (no commit)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from atrium.models.audit import AuditEvent

#: The longest user agent kept in the audit trail.
_USER_AGENT_MAX = 300


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a call came from, as the audit trail records it (both unknown for a task)."""

    ip: str | None = None
    user_agent: str | None = None

    @classmethod
    def of(cls, conn: HTTPConnection | None) -> Origin:
        """The caller's address as the server saw it (proxy headers are uvicorn's job) and its
        user agent, cut to what the audit trail keeps; unknown without a connection."""
        if conn is None:
            return cls()
        agent = conn.headers.get("user-agent")
        return cls(
            ip=conn.client.host if conn.client is not None else None,
            user_agent=agent[:_USER_AGENT_MAX] if agent else None,
        )


def record(
    session: AsyncSession,
    action: str,
    *,
    origin: Origin,
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
        origin: the caller's IP and user agent (``Origin()`` for a task).
        tenant_id: the tenant concerned, if any.
        actor_user_id: the acting person, if any.
        actor_api_key_id: the acting API key, if any.
        target_type: kind of thing acted on (``user``, ``api_key``...).
        target_id: its id.
        data: small JSON details (never secrets).
    """
    event = AuditEvent(
        tenant_id=tenant_id,
        actor_user_id=actor_user_id,
        actor_api_key_id=actor_api_key_id,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        ip=origin.ip,
        user_agent=origin.user_agent,
        data=data or {},
    )
    session.add(event)
    return event
