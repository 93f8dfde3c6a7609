"""An MCP (Model Context Protocol) server at ``/mcp``: search, answer, list_collections and
get_document over streamable HTTP, authenticated by an API key (see docs/mcp.md).

Named ``mcp_server`` so that it is never confused with the ``mcp`` SDK it is built on.
"""

from atrium.mcp_server.server import MCP_PATH, install, running

__all__ = ["MCP_PATH", "install", "running"]
