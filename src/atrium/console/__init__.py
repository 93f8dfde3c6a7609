"""The web console: a static app of plain ES modules served at ``/``, and its cookie session.

The browser keeps the access token in memory only. The refresh token lives in an HttpOnly,
Secure, SameSite=Strict cookie that only the ``/console/session/*`` routes read, and those
routes demand a CSRF token (double submit) and a same-origin request. See
``docs/decisions/0004-web-console.md``.
"""

from atrium.console.endpoints import install

__all__ = ["install"]
