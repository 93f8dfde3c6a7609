"""The error responses routes declare in the OpenAPI document: one table, reused.

Every error has the same body (:class:`~atrium.kit.errors.ErrorBody`). What a route may answer
is declared in three layers, each once:

* every ``/v1`` route (``app.py``): :data:`ANY_ROUTE`, what the framework and middleware
  answer before or around any handler (an unreadable or too large body, invalid parameters,
  a dependency down);
* the caller a router or route admits: :data:`SIGNED_IN` (a person's access token),
  :data:`TENANT` (a member or API key of the path's tenant), :data:`SUPERUSER`;
* the route's own errors, ``responses=errors(409)``.

FastAPI merges them (the route's entry wins for the same status); the schema fuzzing test
(``tests/api/test_fuzz.py``) fails on any status a route returns without declaring it.
"""

from __future__ import annotations

from typing import Any

from atrium.kit.errors import ErrorBody

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}

#: Each error status: what it means for any route of this API.
DESCRIPTIONS: dict[int, str] = {
    400: "The request cannot be read (a body that is not valid JSON, UTF-8 or form data), "
    "or is refused as sent.",
    401: "No valid credentials: a missing, malformed, expired or revoked access token or API key.",
    402: "A plan limit would be exceeded; the detail names the metric, the limit and the use.",
    403: "Authenticated but not allowed: a missing permission or scope, the wrong kind of "
    "credential (an API key on a person's route), or a suspended tenant.",
    404: "Does not exist, or exists where the caller cannot see it.",
    409: "Conflicts with the current state.",
    410: "Existed once, no more (an expired or spent token or link).",
    413: "The body is larger than this route accepts.",
    415: "The content type is not supported.",
    422: "The request is well-formed but invalid; the detail names each field and the fault.",
    429: "Too many requests: a rate limit was reached; retry after ``Retry-After`` seconds.",
    502: "An upstream provider failed.",
    503: "A dependency is unavailable right now; retry after ``Retry-After`` seconds.",
    504: "An upstream provider timed out.",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
    },
    429: _RETRY_AFTER,
    503: _RETRY_AFTER,
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the error statuses ``codes`` (from :data:`DESCRIPTIONS`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        if code in _HEADERS:
            entry["headers"] = _HEADERS[code]
        out[code] = entry
    return out


#: Any /v1 route: the body parser (400), the body limit middleware (413), request
#: validation (422) and the outage handler (503) answer before or around every handler.
ANY_ROUTE = errors(400, 413, 422, 503)

#: Routes for a signed-in person (``LimitedUser``): no or a bad token (401), an API key
#: (403), the per-user limit (429).
SIGNED_IN = errors(401, 403, 429)

#: Routes of the path's tenant (``require(permission)``): no or a bad credential (401), a
#: missing permission or a suspended tenant (403), not a member (404), the plan's per-key
#: or per-user limit (429).
TENANT = errors(401, 403, 404, 429)

#: Superuser routes (``SuperUser``): no or a bad token (401), not a superuser (403).
SUPERUSER = errors(401, 403)
