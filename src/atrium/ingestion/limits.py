"""Upload limits: the one place that decides how large an upload may be.

The tenant's plan (config/plans.toml, with any per-tenant override) sets the largest document;
this module turns it into request-size limits and the messages of their 413s.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from atrium.billing.plans import Limit, get_catalog, largest_upload
from atrium.billing.quota import limits_in_session
from atrium.config import Settings

#: Files accepted in one multipart request.
MAX_FILES_PER_REQUEST = 100
#: Multipart framing, JSON escaping and the other JSON fields add to the documents' own size.
ENVELOPE_BYTES = 1024 * 1024


def max_request_bytes(per_document: int, *, multipart: bool) -> int:
    """The largest upload request body for documents of up to ``per_document`` bytes each.

    A multipart request carries up to :data:`MAX_FILES_PER_REQUEST` files; a JSON request one
    text, with :data:`ENVELOPE_BYTES` to spare for its escapes and other fields. JSON bodies are
    buffered and parsed whole, holding the GIL (pydantic-core does not release it), so they
    get no more than that: a text whose escapes (``\\uXXXX`` for every non-ASCII character, as
    ``ensure_ascii`` encoders write) make it longer goes as a multipart file instead.
    """
    documents = per_document * MAX_FILES_PER_REQUEST if multipart else per_document
    return documents + ENVELOPE_BYTES


def upload_too_large_message(per_document: int, *, multipart: bool) -> str:
    """What a 413 on an upload request says: the limit, and how to stay under it."""
    most = human_bytes(max_request_bytes(per_document, multipart=multipart))
    if multipart:
        return (
            f"The request is larger than {most}: send at most {MAX_FILES_PER_REQUEST} files of "
            f"up to {human_bytes(per_document)} each per request (split larger batches)"
        )
    return (
        f"The request is larger than {most}: the largest document allowed is "
        f"{human_bytes(per_document)}, and JSON escapes count toward the request; send a long "
        "text as a file (multipart/form-data, field 'files') instead"
    )


async def max_upload_bytes(session: AsyncSession, tenant_id: uuid.UUID, settings: Settings) -> int:
    """The largest document (file or JSON text, in bytes) the tenant may upload.

    Args:
        session: the request's session (for the tenant's plan).
        tenant_id: the uploading tenant.
        settings: the application settings (unused: the plan decides, config/plans.toml).
    """
    plan_limit = (await limits_in_session(session, tenant_id))[Limit.max_upload_bytes]
    # An override can no longer be "unlimited"; one written before that rule gets the most
    # any plan allows (the request limit in front of the route is sized from it).
    return largest_upload(get_catalog()) if plan_limit is None else plan_limit


def human_bytes(size: int) -> str:
    """``52428800`` → ``50 MB`` (binary units, as file managers show them)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
