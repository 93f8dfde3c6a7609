"""The web console's cookie session for tests over plain HTTP: its CSRF token and cookies, and a
login through it."""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Any

import httpx

from tests.support.factories import DEFAULT_PASSWORD

REFRESH = "__Secure-atrium_refresh"
CSRF = "__Host-atrium_csrf"


def set_cookies(response: httpx.Response) -> dict[str, Any]:
    """Each Set-Cookie of a response as a morsel (value and attributes)."""
    out: dict[str, Any] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            out[name] = (morsel, header)
    return out


async def csrf(client: httpx.AsyncClient) -> str:
    r = await client.get("/console/session/csrf")
    assert r.status_code == 200, r.text
    token: str = r.json()["csrf_token"]
    assert set_cookies(r)[CSRF][0].value == token
    return token


def headers(token: str, refresh: str | None = None, **extra: str) -> dict[str, str]:
    cookie = f"{CSRF}={token}"
    if refresh is not None:
        cookie += f"; {REFRESH}={refresh}"
    return {"X-CSRF-Token": token, "Cookie": cookie, **extra}


async def console_login(client: httpx.AsyncClient, email: str) -> tuple[str, str, str]:
    """Log in through the console; returns (csrf token, access token, refresh cookie)."""
    token = await csrf(client)
    r = await client.post(
        "/console/session/login",
        json={"username": email, "password": DEFAULT_PASSWORD},
        headers=headers(token),
    )
    assert r.status_code == 200, r.text
    refresh = set_cookies(r)[REFRESH][0].value
    return token, r.json()["access_token"], refresh
