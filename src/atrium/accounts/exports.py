"""Data exports: a ZIP of JSON files with everything Atrium holds about a person.

The ZIP holds ``profile.json``, ``memberships.json`` and, for every tenant the person owns,
``tenants/<id>/tenant.json`` plus one JSON file per tenant-owned table that exists (collections,
documents, API keys, usage...). Tables are read generically from ``Base.metadata`` so the export
keeps up as domains add tables; columns that hold hashes or secrets are never exported.

Download links are signed with the secret key (HMAC-SHA256 over export id and expiry) and expire;
verification accepts every key of the key ring, so rotating the secret does not break fresh links.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import io
import json
import uuid
import zipfile
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts.repository import memberships_of, tenant_rows
from atrium.config import Settings
from atrium.kit.errors import Forbidden, Gone
from atrium.models import Base, Role, User

#: How long a download link stays valid.
LINK_TTL = dt.timedelta(hours=24)

#: Tenant-owned tables exported for owned tenants, in this order, when they exist.
PREFERRED_TABLES = ("collections", "documents", "api_keys")
#: Never exported whatever tenant they belong to (they are about others, or internal).
SKIPPED_TABLES = frozenset({"memberships", "invitations", "audit_events", "tenants"})
_SECRET_WORDS = ("hash", "secret", "password")


def blob_key(user_id: uuid.UUID, export_id: uuid.UUID) -> str:
    """Where an export's ZIP is stored."""
    return f"exports/{user_id}/{export_id}.zip"


def user_prefix(user_id: uuid.UUID) -> str:
    """The prefix of all of a user's exports."""
    return f"exports/{user_id}/"


def _signature(key: str, export_id: uuid.UUID, expires: int) -> str:
    msg = f"export:{export_id}:{expires}".encode()
    return hmac.new(key.encode(), msg, hashlib.sha256).hexdigest()


def signed_url(settings: Settings, export_id: uuid.UUID) -> tuple[str, dt.datetime]:
    """A download link for the export and when it expires."""
    expires_at = dt.datetime.now(dt.UTC).replace(microsecond=0) + LINK_TTL
    expires = int(expires_at.timestamp())
    sig = _signature(settings.secret_keys[0], export_id, expires)
    url = (
        f"{settings.resolved_public_url}/v1/exports/{export_id}/download"
        f"?expires={expires}&signature={sig}"
    )
    return url, expires_at


def check_signature(settings: Settings, export_id: uuid.UUID, expires: int, signature: str) -> None:
    """Accept a download link only if it is signed by us and has not expired.

    Raises:
        Forbidden: the signature does not match.
        Gone: the link expired.
    """
    # Bytes, not str: compare_digest refuses non-ASCII strings (a TypeError, so a 500, for a
    # tampered link); UTF-8 bytes of anything not ours simply do not match.
    sent = signature.encode("utf-8", "surrogateescape")
    valid = any(
        hmac.compare_digest(_signature(key, export_id, expires).encode(), sent)
        for key in settings.secret_keys
    )
    if not valid:
        raise Forbidden("This download link is not valid")
    if expires < int(dt.datetime.now(dt.UTC).timestamp()):
        raise Gone("This download link has expired; open the export again for a fresh link")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _public_columns(table: Table) -> list[Any]:
    return [c for c in table.columns if not any(w in c.name.lower() for w in _SECRET_WORDS)]


def _tenant_tables() -> list[Table]:
    tables = [
        t
        for name, t in Base.metadata.tables.items()
        if "tenant_id" in t.columns and name not in SKIPPED_TABLES
    ]

    def order(t: Table) -> tuple[int, str]:
        if t.name in PREFERRED_TABLES:
            return PREFERRED_TABLES.index(t.name), t.name
        return len(PREFERRED_TABLES), t.name

    return sorted(tables, key=order)


async def _rows(session: AsyncSession, table: Table, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    cols = _public_columns(table)
    rows = await tenant_rows(session, table, cols, tenant_id)
    return [{k: _jsonable(v) for k, v in row._mapping.items()} for row in rows]


def _dump(data: Any) -> str:
    # default=str: other domains' columns (Decimal, time...) export as their text form.
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True, default=str)


async def build_zip(session: AsyncSession, user_id: uuid.UUID) -> bytes:
    """The export ZIP for ``user_id``.

    Raises:
        LookupError: the user no longer exists.
    """
    user = await session.get(User, user_id)
    if user is None:
        raise LookupError(f"user {user_id} no longer exists")
    memberships = await memberships_of(session, user_id)
    profile = {
        "id": str(user.id),
        "email": user.email,
        "name": user.name,
        "is_verified": user.is_verified,
        "created_at": user.created_at.isoformat(),
    }
    member_rows = [
        {
            "tenant_id": str(t.id),
            "tenant_name": t.name,
            "role": m.role.value,
            "joined_at": m.created_at.isoformat(),
        }
        for m, t in memberships
    ]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("profile.json", _dump(profile))
        zf.writestr("memberships.json", _dump(member_rows))
        for m, t in memberships:
            if m.role is not Role.owner:
                continue
            base = f"tenants/{t.id}/"
            zf.writestr(
                base + "tenant.json",
                _dump(
                    {
                        "id": str(t.id),
                        "name": t.name,
                        "plan": t.plan,
                        "status": t.status.value,
                        "created_at": t.created_at.isoformat(),
                    }
                ),
            )
            for table in _tenant_tables():
                zf.writestr(base + f"{table.name}.json", _dump(await _rows(session, table, t.id)))
    return buf.getvalue()
