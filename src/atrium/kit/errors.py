"""One error hierarchy and the handlers that render every error as ``{"error", "detail"}``."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg_pool
import redis.exceptions as redis_errors
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("atrium.errors")


class AtriumError(Exception):
    """Base of every error a client may see.

    Args:
        message: a sentence a person can act on.
        status_code: the HTTP status.
        detail: structured detail; defaults to the message.
        headers: extra response headers (``Retry-After``...).
    """

    status_code: int = 400

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.detail = detail if detail is not None else message
        self.headers = headers

    @property
    def name(self) -> str:
        """The error name sent to clients."""
        return type(self).__name__


class BadRequest(AtriumError):
    """The request cannot be processed as sent."""

    status_code = 400


class Unauthorized(AtriumError):
    """No valid credentials."""

    status_code = 401

    def __init__(self, message: str = "Authentication required", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class PaymentRequired(AtriumError):
    """A plan limit was reached."""

    status_code = 402


class Forbidden(AtriumError):
    """Authenticated but not allowed."""

    status_code = 403


class NotFound(AtriumError):
    """Does not exist, or exists in a tenant the caller cannot see."""

    status_code = 404


class Conflict(AtriumError):
    """Conflicts with the current state."""

    status_code = 409


class Gone(AtriumError):
    """Existed once, no more (expired or spent tokens)."""

    status_code = 410


class PayloadTooLarge(AtriumError):
    """The body is larger than allowed."""

    status_code = 413


class UnsupportedMediaType(AtriumError):
    """The content type is not supported."""

    status_code = 415


class Unprocessable(AtriumError):
    """Well-formed but semantically invalid."""

    status_code = 422


class TooManyRequests(AtriumError):
    """Rate limit reached."""

    status_code = 429


class BadGateway(AtriumError):
    """An upstream provider failed."""

    status_code = 502


class ServiceUnavailable(AtriumError):
    """A dependency is down."""

    status_code = 503


class GatewayTimeout(AtriumError):
    """An upstream provider timed out."""

    status_code = 504


class InternalError(AtriumError):
    """Something failed that should not have: what an unexpected exception is answered as."""

    status_code = 500


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str
    detail: Any


_STATUS_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    422: "ValidationError",
    429: "TooManyRequests",
}


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def _render(exc: AtriumError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.name, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


async def _atrium_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AtriumError)
    return _render(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {
            "loc": list(err.get("loc", ())),
            "msg": str(err.get("msg", "")).removeprefix("Value error, "),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]
    return JSONResponse({"error": "ValidationError", "detail": detail}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    name = _STATUS_NAMES.get(exc.status_code, "HTTPError")
    return JSONResponse(
        {"error": name, "detail": exc.detail},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


#: Seconds a client is told to wait when a dependency is unreachable.
OUTAGE_RETRY_AFTER_SECONDS = 5


def outage_of(exc: BaseException) -> str | None:
    """The dependency ``exc`` (or what it was raised from) says is unreachable, if any.

    Connection failures and time-outs of Redis, of the account database (and SQLite's
    "database is locked" after its busy timeout) and of the vector database are outages the
    client should retry, not bugs.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, redis_errors.ConnectionError | redis_errors.TimeoutError):
            return "Redis"
        if isinstance(current, sa.TimeoutError | sa.OperationalError | sa.InterfaceError) or (
            isinstance(current, sa.DBAPIError) and current.connection_invalidated
        ):
            return "the account database"
        if isinstance(current, psycopg.OperationalError | psycopg_pool.PoolTimeout):
            return "the vector database"
        current = current.__cause__ or current.__context__
    return None


def outage_error(component: str) -> ServiceUnavailable:
    """What a client is told while ``component`` (named by :func:`outage_of`) is unreachable.

    A 503 with ``Retry-After``, not a 500: the client should retry (operations.md). The routes'
    handler and the MCP tools both answer with it.
    """
    return ServiceUnavailable(
        f"{component[0].upper()}{component[1:]} is unavailable right now; retry in "
        f"{OUTAGE_RETRY_AFTER_SECONDS} seconds",
        headers={"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)},
    )


def internal_error(request_id: str) -> InternalError:
    """What a client is told about any other unexpected exception: never its details (they
    are logged with the request id), only the request id to quote."""
    return InternalError(
        f"An unexpected error occurred. Quote request id {request_id} when reporting it."
    )


def _outage_response(request: Request, component: str, exc: Exception) -> JSONResponse:
    log.warning(
        "dependency_unavailable",
        request_id=_request_id(request),
        component=component,
        error=f"{type(exc).__name__}: {exc}"[:500],
    )
    return _render(outage_error(component))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    component = outage_of(exc)
    if component is not None:
        # A dependency is down or overloaded: 503 with Retry-After, not a 500 (operations.md).
        return _outage_response(request, component, exc)
    # Never send a stack trace: log it with the request id and hand that id to the client.
    rid = _request_id(request)
    log.exception("unhandled_error", request_id=rid, exc_info=exc)
    return _render(internal_error(rid))


async def _dependency_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised inside a route: answered here, so the server does not also log it as a crash.
    return await _unhandled(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers so every error has the same shape."""
    app.add_exception_handler(AtriumError, _atrium_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for outage in (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        sa.DBAPIError,
        sa.TimeoutError,
        psycopg.OperationalError,
        psycopg_pool.PoolTimeout,
    ):
        app.add_exception_handler(outage, _dependency_error)
    # Anything else (and outages raised by a middleware, outside the routes): 500 or 503.
    app.add_exception_handler(Exception, _unhandled)
