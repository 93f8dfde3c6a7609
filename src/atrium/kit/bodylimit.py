"""Request body limits: every byte a client streams is counted, whatever the framing.

A ``Content-Length`` check alone is not a limit: a chunked body has none, and
``request.body()``, ``request.json()`` or ``request.form()`` then read whatever comes. The API
is published by gunicorn directly (no proxy is guaranteed in front of it), so the app enforces
the limit itself, in :class:`BodyLimitMiddleware`, a plain ASGI middleware that

* answers 413 at once, before the route runs, when the declared ``Content-Length`` is over the
  route's limit;
* otherwise counts the bytes of each ``http.request`` message as the route reads them and raises
  :class:`RequestTooLarge` (413) as soon as the count passes the limit, so at most one chunk
  more than the limit is ever read, and the rest of the body never leaves the socket.

Every route gets ``ATRIUM_MAX_REQUEST_BODY_BYTES`` (1 MiB: JSON and forms) unless a
:class:`BodyLimitRule` names a larger one for its path (uploads: the largest request any plan
allows). A route that knows more, once the caller is known, lowers the limit of its own request
with :func:`restrict` before it reads the body (the upload route applies the tenant's plan).

The 413 has the usual ``{"error": "PayloadTooLarge", "detail": <message>}`` body, and
``Connection: close`` so the server drops the unread rest of the body instead of draining it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atrium.kit.errors import PayloadTooLarge

#: Where the request's :class:`BodyBudget` lives in the ASGI scope.
SCOPE_KEY = "atrium.body_limit"

#: After a 413, the rest of the body is read and dropped for at most this long and this much
#: (a "lingering close", as nginx does): a client that sends its whole body before it reads
#: (httpx, requests) then gets the 413 instead of a connection reset, which is what closing a
#: socket with unread data causes. Memory stays flat: every chunk is dropped as it comes.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024 * 1024


class RequestTooLarge(PayloadTooLarge, StarletteHTTPException):  # type: ignore[misc]
    """413: the request body is over its route's limit.

    Also a Starlette ``HTTPException``: FastAPI turns any other error raised while it reads a
    body into a 400 "error parsing the body", but lets HTTP exceptions through. The app's
    handler for :class:`~atrium.kit.errors.AtriumError` (first in the method resolution order)
    renders it.
    """

    def __init__(self, message: str) -> None:
        # Not the cooperative chain: AtriumError's super() would be HTTPException's __init__,
        # which reads its first argument as the status code.
        Exception.__init__(self, message)
        self.message = message
        self.status_code = 413
        self.detail = message
        self.headers = None

    @property
    def name(self) -> str:
        """The error name sent to clients, the same as every other 413."""
        return "PayloadTooLarge"


@dataclass
class BodyBudget:
    """One request's limit and what it has used.

    Attributes:
        limit: the most body bytes this request may send.
        message: the sentence a 413 carries (what the limit is, what to do).
        declared: the ``Content-Length`` header, when there was a valid one.
        received: body bytes read so far.
        exceeded: whether this request was refused for its size.
    """

    limit: int
    message: str
    declared: int | None = None
    received: int = 0
    exceeded: bool = field(default=False)
    complete: bool = field(default=False)

    def check(self) -> None:
        """Raise :class:`RequestTooLarge` when the declared or received size is over the limit.

        Raises:
            RequestTooLarge: over the limit.
        """
        if self.received > self.limit or (self.declared is not None and self.declared > self.limit):
            self.exceeded = True
            raise RequestTooLarge(self.message)


@dataclass(frozen=True)
class BodyLimitRule:
    """A larger (or smaller) limit for some routes.

    Attributes:
        method: the HTTP method (``POST``).
        path: a regular expression the whole path must match.
        limit: the most body bytes.
        message: the sentence a 413 carries.
    """

    method: str
    path: re.Pattern[str]
    limit: int
    message: str


def declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, or None when absent or not a number.

    The server (h11, httptools) refuses a malformed Content-Length itself; here a bad one only
    means the limit is enforced on the bytes actually streamed.
    """
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def restrict(request: Request, limit: int, message: str) -> None:
    """Lower this request's body limit (never raise it), before the route reads the body.

    Call it once the route knows the caller's own limit (a tenant's plan). Without
    :class:`BodyLimitMiddleware` in front only the declared ``Content-Length`` is checked.

    Args:
        request: the request.
        limit: the most body bytes this request may send.
        message: the sentence a 413 carries.

    Raises:
        RequestTooLarge: when the declared length, or what was read already, is over ``limit``.
    """
    budget: BodyBudget | None = request.scope.get(SCOPE_KEY)
    if budget is None:
        budget = BodyBudget(limit, message, declared=declared_length(request.scope))
        request.scope[SCOPE_KEY] = budget
    elif limit < budget.limit:
        budget.limit = limit
        budget.message = message
    budget.check()


def _refusal(message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"error": "PayloadTooLarge", "detail": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


class BodyLimitMiddleware:
    """Counts the request body bytes of every HTTP request against its route's limit.

    Args:
        app: the ASGI app.
        default_limit: the limit of routes no rule names (JSON and forms).
        default_message: the sentence a 413 carries for them.
        rules: larger (or smaller) limits for some routes; the first match wins.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        default_message: str,
        rules: Sequence[BodyLimitRule] = (),
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.default_message = default_message
        self.rules = tuple(rules)

    def _limit_for(self, method: str, path: str) -> tuple[int, str]:
        for rule in self.rules:
            if rule.method == method and rule.path.fullmatch(path):
                return rule.limit, rule.message
        return self.default_limit, self.default_message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self._limit_for(scope["method"], scope["path"])
        budget = BodyBudget(limit, message, declared=declared_length(scope))
        scope[SCOPE_KEY] = budget
        try:
            budget.check()
        except RequestTooLarge:
            # Declared too large: answer without running the route (what is read is dropped).
            await self._refuse(send, receive, budget)
            return
        started = False

        async def limited_receive() -> Message:
            # A route that caught the 413 and read again gets the same answer, not more bytes.
            if budget.exceeded:
                raise RequestTooLarge(budget.message)
            message = await receive()
            if message["type"] == "http.request":
                budget.received += len(message.get("body", b""))
                budget.complete = not message.get("more_body", False)
                budget.check()
            else:
                budget.complete = True  # http.disconnect
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if budget.exceeded:
                    # The rest of the body is still on its way: close rather than drain it.
                    headers = [
                        (k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"
                    ]
                    message["headers"] = [*headers, (b"connection", b"close")]
            elif (
                message["type"] == "http.response.body"
                and budget.exceeded
                and not message.get("more_body", False)
            ):
                # The whole 413 goes out first; the response ends once the rest is dropped.
                await send({**message, "more_body": True})
                await _linger(receive, budget)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge as exc:
            # Raised where no exception handler runs (another middleware reading the body).
            if started:
                raise
            budget.message = exc.message
            await self._refuse(send, receive, budget)

    @staticmethod
    async def _refuse(send: Send, receive: Receive, budget: BodyBudget) -> None:
        headers, body = _refusal(budget.message)
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await _linger(receive, budget)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _linger(receive: Receive, budget: BodyBudget) -> None:
    """Read and drop the rest of a refused body, within :data:`LINGER_SECONDS` and
    :data:`LINGER_BYTES` (then the server closes the connection)."""
    if budget.complete:
        return
    dropped = 0
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            while dropped <= LINGER_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return
