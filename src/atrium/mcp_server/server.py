"""The MCP server at ``/mcp``: the official SDK's streamable HTTP transport, stateless.

Stateless: every POST is served on its own (no ``Mcp-Session-Id``, nothing kept between
requests), so any replica behind the load balancer can answer any request, as with the rest of
the API. Replies are plain JSON rather than an SSE stream: tools answer once, and JSON passes
every proxy untouched.

A request goes through the app's middleware (request id, CORS, body limit, access log,
rate-limit headers) like any route, then the gate: the API key is authenticated and counted
against its rate limit (401/403/429 with the app's ``{"error", "detail"}`` body, before any MCP
handling), and only then does the SDK's session manager see the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from atrium.config import Settings
from atrium.kit.errors import ServiceUnavailable
from atrium.mcp_server.auth import authenticate
from atrium.mcp_server.tools import register_tools

#: Where the endpoint is mounted.
MCP_PATH = "/mcp"

INSTRUCTIONS = (
    "Atrium holds this organisation's documents. Use `search` to find passages relevant to a "
    "question and cite them as [n] with their document title; `answer` returns a grounded "
    "answer with citations. `list_collections` shows what there is to search; "
    "`get_document` describes one document (its id comes from search results)."
)


def build_server(version: str) -> MCPServer[Any]:
    """The MCP server with Atrium's tools (no transport yet)."""
    server: MCPServer[Any] = MCPServer(
        name="atrium",
        title="Atrium",
        instructions=INSTRUCTIONS,
        version=version,
        # Nothing to subscribe to: the tools read, and a listen stream would hold a
        # connection open on one replica for nothing.
        subscriptions=False,
    )
    register_tools(server)
    return server


def _session_manager(server: MCPServer[Any], settings: Settings) -> StreamableHTTPSessionManager:
    server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        max_request_body_size=settings.max_request_body_bytes,
        # The SDK's DNS-rebinding check guards servers that trust whoever can reach them
        # (a local server without credentials). Every request here carries an API key a
        # rebinding page does not have, and the allowed Host values would be the
        # deployment's own names (behind proxies): off, like the rest of the API.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    return server.session_manager


class McpEndpoint:
    """The ASGI app at ``/mcp``: authenticate, then hand the request to the SDK.

    Errors raised here (before a response starts) reach the app's exception handlers, so a
    refused request gets exactly the body and headers a route would have sent.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method != "POST":
            # Stateless: no server-to-client SSE stream to GET (the SDK would hold the
            # connection open for nothing) and no session to DELETE. The transport lets a
            # server answer 405 to both.
            raise HTTPException(
                status_code=405,
                detail="The MCP endpoint takes POST only: it keeps no sessions and offers no "
                "SSE stream",
                headers={"Allow": "POST"},
            )
        manager: StreamableHTTPSessionManager | None = getattr(
            request.app.state, "mcp_sessions", None
        )
        if manager is None:
            raise ServiceUnavailable("The MCP endpoint is starting or stopping; retry shortly")
        await authenticate(request)
        await manager.handle_request(scope, receive, send)


def install(app: FastAPI) -> None:
    """Mount ``/mcp`` on ``app``; :func:`running` starts its session manager in the lifespan."""
    app.state.mcp_server = build_server(app.version)
    # A plain route (not a Mount): "/mcp" itself matches, without a redirect to "/mcp/".
    # Every method reaches the endpoint, which answers 405 to all but POST.
    app.router.routes.append(Route(MCP_PATH, McpEndpoint(), name="mcp", include_in_schema=False))


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[None]:
    """Run the MCP session manager for as long as the app runs (inside its lifespan).

    A manager runs once, so each lifespan gets a fresh one.
    """
    manager = _session_manager(app.state.mcp_server, app.state.settings)
    async with manager.run():
        app.state.mcp_sessions = manager
        try:
            yield
        finally:
            app.state.mcp_sessions = None
