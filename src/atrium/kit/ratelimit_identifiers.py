"""Who a rate limit counts: the identifiers that pick a caller's bucket.

An identifier is an async function of the request (:data:`Identifier`, fastapi-limiter's
interface) that returns the part of the Redis key naming the caller; ``kit.ratelimit`` counts
each one in its own bucket. Two are offered: :func:`by_ip` (IPv6 by its /64) for anonymous
routes, and :func:`by_field` (a field of the body, e.g. the e-mail address of a login, so one
account cannot be hammered from many addresses). A field is normalised and hashed before it
reaches Redis (e-mail addresses are personal data), and a request without a readable field is
counted under the shared :data:`MISSING` identifier rather than skipping the limit.

Kept apart from ``kit.ratelimit`` because they answer a different question (whose bucket, not
how a bucket is counted) and depend on nothing there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

Identifier = Callable[[Request], Awaitable[str | None]]


def client_ip(request: Request) -> str:
    """The peer address. Proxy headers are trusted only through uvicorn's ``--forwarded-allow-ips``
    (which rewrites the client); a raw ``X-Forwarded-For`` would let anyone pick their bucket."""
    return request.client.host if request.client else "unknown"


def ip_bucket(host: str) -> str:
    """The bucket of a peer address: an IPv4 address as is, an IPv6 client by its /64.

    One IPv6 subscriber usually holds a whole /64 (often more): keyed on the full address, a
    client would get 2**64 fresh buckets for free. An IPv4-mapped address (``::ffff:a.b.c.d``,
    from dual-stack sockets) is the IPv4 client it maps.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # "unknown", or a test transport's name
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        # From the integer: a scoped address (fe80::1%eth0) has the same /64.
        return str(ipaddress.IPv6Network(((int(address) >> 64) << 64, 64)))
    return str(address)


async def by_ip(request: Request) -> str | None:
    """Identify the caller by IP address (IPv6: by /64, see :func:`ip_bucket`)."""
    return "ip:" + ip_bucket(client_ip(request))


def _normalise(value: str) -> str:
    # Case, compatibility forms and accents folded, so spellings the account database may
    # treat as the same address (case- and accent-insensitive collations) share one bucket.
    decomposed = unicodedata.normalize("NFKD", value.strip())
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return unicodedata.normalize("NFKC", bare).casefold()


def _digest(value: str) -> str:
    return hashlib.sha256(_normalise(value).encode()).hexdigest()[:32]


#: The identifier of requests whose field could not be read (absent, empty, not a string, or an
#: unparseable body): they share one bucket instead of escaping the limit.
MISSING = "missing"


def media_type(request: Request) -> str:
    """The request's media type, lower-cased and without parameters (``""`` when absent).

    Media types are case-insensitive (RFC 9110), and FastAPI and python-multipart parse them
    so: a comparison on the raw header is one the client can dodge.
    """
    raw = request.headers.get("content-type", "")
    return raw.split(";", 1)[0].strip().lower()


async def _field_value(request: Request, field: str) -> Any:
    kind = media_type(request)
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        # The form FastAPI validates: Starlette caches it on the request, so it is parsed once.
        return (await request.form()).get(field)
    if not kind or kind == "application/json" or kind.endswith("+json"):
        # FastAPI parses a body as JSON for these media types and when there is none.
        body = await request.json()
        return body.get(field) if isinstance(body, dict) else None
    return None  # a body FastAPI will not parse: the route refuses it (422)


def by_field(field: str) -> Identifier:
    """Identify the caller by a field of the request body (form or JSON), e.g. the e-mail
    address of a login, so one account cannot be hammered from many addresses.

    The body is read the way FastAPI reads it for the route (the media type compared without
    regard to case, JSON when there is no Content-Type), so a request the route accepts always
    yields its own field. The value is normalised (trimmed, case and accents folded) and
    hashed. A request without a usable field (absent, not a string, an unparseable body) fails
    closed: it is counted under the shared :data:`MISSING` identifier rather than skipping the
    limit. The body is bounded by :class:`~atrium.kit.bodylimit.BodyLimitMiddleware`.
    """

    async def identify(request: Request) -> str | None:
        try:
            value = await _field_value(request, field)
        except ValueError:  # not JSON, not UTF-8
            value = None
        if not isinstance(value, str) or not value.strip():
            return f"{field}:{MISSING}"
        return f"{field}:{_digest(value)}"

    return identify


#: Aliases for readability at the call site.
by_form_field = by_field
by_json_field = by_field
