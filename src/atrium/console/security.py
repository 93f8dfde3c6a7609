"""Console security: the Content-Security-Policy, session cookies and the CSRF check.

The refresh-token cookie is HttpOnly, Secure and SameSite=Strict, and scoped to the
``/console/session`` path so no other route ever receives it. Browsers (Chromium, Firefox)
accept Secure cookies from ``http://localhost`` and ``http://127.0.0.1`` for development;
anywhere else the console must be served over HTTPS.

CSRF: the routes that read the cookie require a ``X-CSRF-Token`` header equal to the
``__Host-atrium_csrf`` cookie (double submit: another site can neither read that cookie nor set
a custom header on a cross-site request without a CORS preflight), and refuse requests whose
``Origin`` or ``Sec-Fetch-Site`` says they came from another site.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

from fastapi import Request, Response

from atrium.config import Settings
from atrium.kit.errors import Forbidden

#: Applied to every console page, asset and session response. No inline script or style.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)

#: The refresh token. ``__Secure-``: browsers refuse it unless it is Secure.
REFRESH_COOKIE = "__Secure-atrium_refresh"
REFRESH_COOKIE_PATH = "/console/session"
#: The CSRF token, readable by the console's script. ``__Host-``: Secure, Path=/, no Domain,
#: so a sibling subdomain cannot plant its own value.
CSRF_COOKIE = "__Host-atrium_csrf"
CSRF_HEADER = "X-CSRF-Token"
_CSRF_BYTES = 32


def new_csrf_token() -> str:
    """A fresh random CSRF token."""
    return secrets.token_urlsafe(_CSRF_BYTES)


def _plausible_csrf(value: str | None) -> bool:
    return bool(value) and 20 <= len(value or "") <= 100


def ensure_csrf_cookie(request: Request, response: Response) -> str:
    """Give the browser a CSRF cookie unless it already has a plausible one; return its value."""
    current = request.cookies.get(CSRF_COOKIE)
    if current is not None and _plausible_csrf(current):
        return current
    token = new_csrf_token()
    response.set_cookie(
        CSRF_COOKIE, token, path="/", secure=True, httponly=False, samesite="strict"
    )
    return token


def set_refresh_cookie(response: Response, settings: Settings, refresh_token: str) -> None:
    """Store the refresh token in its HttpOnly cookie for the token's lifetime."""
    response.set_cookie(
        REFRESH_COOKIE,
        refresh_token,
        max_age=settings.refresh_token_ttl_seconds,
        path=REFRESH_COOKIE_PATH,
        secure=True,
        httponly=True,
        samesite="strict",
    )


def clear_refresh_cookie(response: Response) -> None:
    """Tell the browser to forget the refresh token."""
    response.delete_cookie(
        REFRESH_COOKIE, path=REFRESH_COOKIE_PATH, secure=True, httponly=True, samesite="strict"
    )


def security_headers(response: Response) -> None:
    """Add the Content-Security-Policy every console response carries."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _own_origins(request: Request) -> set[str]:
    settings: Settings = request.app.state.settings
    origins = {_origin(settings.resolved_public_url), _origin(str(request.base_url))}
    return origins


async def require_csrf(request: Request) -> None:
    """Dependency of the cookie routes: refuse cross-site requests and missing CSRF tokens.

    Raises:
        Forbidden: the request came from another site, or its CSRF header does not match the
            CSRF cookie.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden("Cross-site requests to the console session are refused")
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() not in _own_origins(request):
        raise Forbidden("Requests from another origin to the console session are refused")
    cookie = request.cookies.get(CSRF_COOKIE)
    header = request.headers.get(CSRF_HEADER)
    if not (cookie and header and _plausible_csrf(cookie)):
        raise Forbidden(
            f"Missing CSRF token: send the {CSRF_COOKIE} cookie's value in the {CSRF_HEADER} "
            "header (reload the page if the cookie is missing)"
        )
    if not secrets.compare_digest(cookie.encode(), header.encode()):
        raise Forbidden("The CSRF token does not match; reload the page and try again")
