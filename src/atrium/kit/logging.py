"""structlog configuration and the ASGI middleware that logs one line per request."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atrium.kit import ratelimit

_configured = False


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    """Route stdlib and structlog output through one renderer (JSON by default)."""
    global _configured
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    renderer,
                ],
                foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            )
        )
        root = logging.getLogger()
        root.handlers = [handler]
        root.setLevel(level.upper())
        # uvicorn's own access log would duplicate ours.
        logging.getLogger("uvicorn.access").disabled = True
        _configured = True


SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
_access_log = structlog.get_logger("atrium.access")


def _route_template(scope: Scope) -> str | None:
    """The matched route as a template with its router prefix (``/v1/tenants/{tenant_id}``).

    ``scope["route"]`` holds the route as its router declared it, without the prefix given to
    ``include_router``; resolving against the app's routes gives the full template.
    """
    route = scope.get("route")
    if route is None:
        return None
    # Resolving walks every route of the app (a visible share of a fast request), and the
    # answer only depends on which route matched: remember it per route object.
    key = (id(scope.get("app")), id(route), scope.get("method"))
    template = _TEMPLATES.get(key)
    if template is None:
        # lazy: the `atrium` command imports this module on every start, and these two cost
        # it a tenth of its start; only the API, when a route is first logged, needs them
        from prometheus_fastapi_instrumentator.routing import get_route_name
        from starlette.requests import HTTPConnection

        template = get_route_name(HTTPConnection(scope), should_include_root_path=False)
        if template is None:
            return None
        if len(_TEMPLATES) >= 10_000:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    return template


_TEMPLATES: dict[tuple[int, int, object], str] = {}


class RequestContextMiddleware:
    """Request id, security and rate-limit headers, and one structured log line per request.

    A plain ASGI middleware (not ``BaseHTTPMiddleware``) so streaming responses pass through
    untouched and the hot path stays cheap.
    """

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.headers = list(SECURITY_HEADERS)
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                # Accept a caller's id only when it is short and printable, to keep logs clean.
                candidate = value.decode("latin-1")
                if len(candidate) <= 64 and candidate.isprintable():
                    rid = candidate
                break
        rid = rid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                headers.extend(self.headers)
                if ratelimit.STATE_KEY in state:
                    present = {name.lower() for name, _ in headers}
                    headers.extend(ratelimit.response_headers(state, present))
                message["headers"] = headers
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _access_log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                route=_route_template(scope),
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 2),
                tenant_id=state.get("tenant_id"),
                principal=state.get("principal"),
            )
            structlog.contextvars.unbind_contextvars("request_id")
