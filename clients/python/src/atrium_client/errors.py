"""Typed exceptions: every error the API answers becomes an :class:`AtriumError` subclass.

The server answers every error as ``{"error": "<Name>", "detail": ...}`` and sets the
``X-Request-ID`` header on every response; both travel with the exception, so a log line can
quote the request id an operator needs to find the server's own log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

#: The response header that carries the server's request id.
REQUEST_ID_HEADER = "X-Request-ID"


class AtriumError(Exception):
    """Base of every error this client raises.

    Attributes:
        message: a sentence describing the error (the server's detail when it is a string).
        status_code: the HTTP status, or None when no response arrived.
        error: the server's error name (``NotFound``, ``ValidationError``...), if any.
        detail: the server's ``detail`` field (a string, a list of field errors, or a dict).
        request_id: the ``X-Request-ID`` of the response, if any.
        headers: the response headers (empty when no response arrived).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error: str | None = None,
        detail: Any = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error = error
        self.detail = detail
        self.request_id = request_id
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.insert(0, f"{self.status_code} {self.error or 'Error'}:")
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)


class APIConnectionError(AtriumError):
    """The server could not be reached, or the connection broke (no HTTP response)."""


class APITimeoutError(APIConnectionError):
    """The request timed out before the server answered."""


class APIStatusError(AtriumError):
    """The server answered with an error status (the base of the status-specific errors)."""


class ValidationError(APIStatusError):
    """400 or 422: the request is malformed or invalid; ``detail`` lists the fields at fault."""


class AuthenticationError(APIStatusError):
    """401: no valid credentials (a missing, revoked or expired key or token)."""


class PaymentRequired(APIStatusError):
    """402: a plan limit (quota) was reached."""


class PermissionDenied(APIStatusError):
    """403: authenticated, but the key's scopes or the user's role do not allow this."""


class NotFound(APIStatusError):
    """404: does not exist, or belongs to a tenant the caller cannot see."""


class Conflict(APIStatusError):
    """409: conflicts with the current state (a taken name, a collection being deleted...)."""


class PayloadTooLarge(APIStatusError):
    """413: the request body (a document) is larger than allowed."""


class UnsupportedMediaType(APIStatusError):
    """415: a file type the server does not accept."""


class _RetryAfterMixin(APIStatusError):
    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the client to wait (``Retry-After``), if it said."""
        return parse_retry_after(self.headers.get("retry-after"))


class RateLimited(_RetryAfterMixin):
    """429: a rate limit was reached; ``retry_after`` says when to try again."""


class ServiceUnavailable(_RetryAfterMixin):
    """503: a dependency of the server is down; ``retry_after`` says when to try again."""


class ServerError(APIStatusError):
    """Any other 5xx answer (an internal error, a failing or slow LLM provider)."""


class WaitTimeout(AtriumError):
    """``wait_until_ready`` ran out of time; ``documents`` holds their last known state.

    Attributes:
        documents: each awaited document as last read (some still queued or processing).
        pending: the ids of the documents that had not reached ``ready`` or ``failed``.
    """

    def __init__(self, message: str, *, documents: Sequence[Any], pending: Sequence[Any]) -> None:
        super().__init__(message)
        self.documents = list(documents)
        self.pending = list(pending)


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: ValidationError,
    401: AuthenticationError,
    402: PaymentRequired,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import datetime as dt
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _message(error: str | None, detail: Any, response: httpx.Response) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and isinstance(detail.get("message"), str):
        return str(detail["message"])
    if isinstance(detail, list) and detail:
        fields = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                fields.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg")))
        if fields:
            return "; ".join(fields)
    return error or response.reason_phrase or f"HTTP {response.status_code}"


def error_from_response(response: httpx.Response, body: bytes | None = None) -> APIStatusError:
    """The typed exception for an error response (its body already read, or given)."""
    raw = response.content if body is None else body
    error: str | None = None
    detail: Any = None
    try:
        import json

        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        error = str(parsed.get("error"))
        detail = parsed.get("detail")
    elif raw:
        detail = raw.decode("utf-8", "replace")[:2000]
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    return cls(
        _message(error, detail, response),
        status_code=status,
        error=error,
        detail=detail,
        request_id=response.headers.get(REQUEST_ID_HEADER),
        headers={k.lower(): v for k, v in response.headers.items()},
    )
