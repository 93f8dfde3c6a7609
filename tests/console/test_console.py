"""The web console over plain HTTP: pages, assets, CSP, and the cookie session with its CSRF
checks. (The browser journey is in tests/e2e.)

httpx keeps no Secure cookie for ``http://testserver``, so the tests carry cookies by hand,
exactly as the Set-Cookie headers give them.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from atrium.console.security import CONTENT_SECURITY_POLICY
from tests.support.console import CSRF, REFRESH, console_login, csrf, headers, set_cookies
from tests.support.factories import DEFAULT_PASSWORD, bearer, create_tenant, create_user

STATIC = Path(__file__).resolve().parents[2] / "src" / "atrium" / "console" / "static"


# Pages and assets ------------------------------------------------------------------------


PAGES = [
    "/",
    "/signup",
    "/login",
    "/verify-email?token=abc",
    "/forgot-password",
    "/reset-password?token=abc",
    "/invitations/accept?token=abc",
    "/account",
    "/tenants",
    "/tenants/7c8e1b4e-6f0e-4a52-9a57-1f3f8a5f4b10/collections",
]


@pytest.mark.parametrize("path", PAGES)
async def test_pages_are_the_shell_with_a_strict_csp(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="/console/static/js/main.js"></script>' in r.text
    # The CSRF cookie: readable by the script, Secure, SameSite=Strict, whole site.
    morsel, raw = set_cookies(r)[CSRF]
    assert len(morsel.value) >= 40
    assert morsel["secure"] and morsel["samesite"] == "strict" and morsel["path"] == "/"
    assert "httponly" not in raw.lower()


async def test_a_plausible_csrf_cookie_is_kept(client: httpx.AsyncClient) -> None:
    token = await csrf(client)
    r = await client.get("/login", headers={"Cookie": f"{CSRF}={token}"})
    assert CSRF not in set_cookies(r)


def test_the_csp_forbids_inline_code_and_foreign_sources() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    assert directives["base-uri"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_static_files_keep_to_the_csp_and_never_store_tokens() -> None:
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script in index.html"
    assert not re.search(r"<style", html) and " style=" not in html
    banned = re.compile(
        r"\b(localStorage|sessionStorage|indexedDB)\s*[.\[]|\.(innerHTML|outerHTML)\b|"
        r"insertAdjacentHTML|\beval\(|new Function|document\.write|\.style\s*="
    )
    for path in STATIC.rglob("*.js"):
        found = banned.search(path.read_text())
        assert found is None, f"{path.name} uses {found and found.group(0)}"


async def test_assets_are_served_with_the_csp(client: httpx.AsyncClient) -> None:
    r = await client.get("/console/static/console.css")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/css")
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    # Every module the app imports is served (the module graph has no build step).
    pending, seen = ["js/main.js"], set()
    while pending:
        rel = pending.pop()
        if rel in seen:
            continue
        seen.add(rel)
        r = await client.get(f"/console/static/{rel}")
        assert r.status_code == 200, rel
        assert "javascript" in r.headers["content-type"], rel
        base = rel.rsplit("/", 1)[0]
        for spec in re.findall(r'from "(\.{1,2}/[^"]+)"', r.text):
            parts = base.split("/")
            for piece in spec.split("/"):
                if piece == "..":
                    parts.pop()
                elif piece != ".":
                    parts.append(piece)
            pending.append("/".join(parts))
    assert len(seen) >= 14


async def test_unknown_paths_stay_json_404(client: httpx.AsyncClient) -> None:
    for path in ("/nope", "/v1/nope", "/console/static/nope.js"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("application/json"), path


async def test_meta_comes_from_the_permission_table(client: httpx.AsyncClient) -> None:
    r = await client.get("/console/meta")
    assert r.status_code == 200
    body = r.json()
    assert "keys:manage" in body["role_permissions"]["admin"]
    assert "keys:manage" not in body["role_permissions"]["member"]
    assert "search" in body["scopes"] and body["max_files_per_upload"] >= 1
    assert body["password_min_length"] >= 8


async def test_mail_links_open_console_pages(
    client: httpx.AsyncClient, app: Any, mailbox: Any, settings: Any, celery_worker: Any
) -> None:
    """The verification, reset and invitation mails link to pages the console serves."""
    # Addresses of this test alone: the mailbox is the session's, and a rerun must not read
    # the mail of an earlier run.
    email = f"console-links-{uuid.uuid4().hex[:10]}@example.com"
    invitee = f"invitee-console-{uuid.uuid4().hex[:10]}@example.com"
    r = await client.post(
        "/v1/auth/register", json={"email": email, "password": "a long enough password 1"}
    )
    assert r.status_code == 201, r.text
    verify = mailbox.wait_for(email, "Verify")
    r = await client.post("/v1/auth/forgot-password", json={"email": email})
    assert r.status_code == 202
    reset = mailbox.wait_for(email, "Reset")
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    r = await client.post(
        f"/v1/tenants/{tenant.id}/invitations",
        json={"email": invitee},
        headers=await bearer(owner),
    )
    assert r.status_code == 201, r.text
    invite = mailbox.wait_for(invitee, "invited you")
    pages = [(verify, "/verify-email"), (reset, "/reset-password"), (invite, "/invitations/accept")]
    for mail, page in pages:
        link = next(u for u in mail.links() if "token=" in u)
        parts = urlsplit(link)
        assert f"{parts.scheme}://{parts.netloc}" == settings.resolved_public_url
        assert parts.path == page
        r = await client.get(f"{parts.path}?{parts.query}")
        assert r.status_code == 200 and "main.js" in r.text


# The cookie session ----------------------------------------------------------------------


async def test_login_sets_a_strict_httponly_refresh_cookie(
    client: httpx.AsyncClient, app: Any, settings: Any
) -> None:
    user = await create_user(app)
    token = await csrf(client)
    r = await client.post(
        "/console/session/login",
        json={"username": user.email.upper(), "password": DEFAULT_PASSWORD},
        headers=headers(token),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}  # no refresh token
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    morsel, raw = set_cookies(r)[REFRESH]
    assert morsel["httponly"] and morsel["secure"]
    assert morsel["samesite"] == "strict"
    assert morsel["path"] == "/console/session"  # no other route ever receives it
    assert int(morsel["max-age"]) == settings.refresh_token_ttl_seconds
    assert "domain" not in raw.lower()
    me = await client.get(
        "/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert me.status_code == 200 and me.json()["email"] == user.email


@pytest.mark.parametrize("route", ["login", "refresh", "logout"])
async def test_cookie_routes_refuse_requests_without_the_csrf_token(
    client: httpx.AsyncClient, app: Any, route: str
) -> None:
    user = await create_user(app)
    token, access, refresh = await console_login(client, user.email)
    body = {"username": user.email, "password": DEFAULT_PASSWORD}
    cookie = f"{CSRF}={token}; {REFRESH}={refresh}"
    attempts = [
        {"Cookie": cookie},  # no header
        {"Cookie": cookie, "X-CSRF-Token": "x" * 43},  # header does not match the cookie
        {"Cookie": f"{REFRESH}={refresh}", "X-CSRF-Token": token},  # no cookie
        {**headers(token, refresh), "Origin": "https://evil.example"},
        {**headers(token, refresh), "Sec-Fetch-Site": "cross-site"},
        {**headers(token, refresh), "Sec-Fetch-Site": "same-site"},
    ]
    for h in attempts:
        r = await client.post(f"/console/session/{route}", json=body, headers=h)
        assert r.status_code == 403, (h, r.text)
        assert r.json()["error"] == "Forbidden"
        assert REFRESH not in set_cookies(r)
    # The session is untouched by the refused attempts.
    me = await client.get("/v1/users/me", headers={"Authorization": f"Bearer {access}"})
    assert me.status_code == 200
    # Same-origin requests carrying the token pass.
    ok = await client.post(
        "/console/session/refresh",
        headers={
            **headers(token, refresh),
            "Origin": "http://testserver",
            "Sec-Fetch-Site": "same-origin",
        },
    )
    assert ok.status_code == 200, ok.text


async def test_refresh_rotates_the_cookie_and_a_replay_ends_the_session(
    client: httpx.AsyncClient, app: Any
) -> None:
    user = await create_user(app)
    token, _, first = await console_login(client, user.email)
    r = await client.post("/console/session/refresh", headers=headers(token, first))
    assert r.status_code == 200, r.text
    second = set_cookies(r)[REFRESH][0].value
    assert second != first
    new_access = r.json()["access_token"]
    me = await client.get("/v1/users/me", headers={"Authorization": f"Bearer {new_access}"})
    assert me.status_code == 200
    # Replaying the spent cookie: 401, the cookie is cleared and the whole session ends.
    r = await client.post("/console/session/refresh", headers=headers(token, first))
    assert r.status_code == 401
    assert "already used" in r.json()["detail"]
    morsel, _ = set_cookies(r)[REFRESH]
    assert morsel.value == "" and int(morsel["max-age"]) == 0
    r = await client.post("/console/session/refresh", headers=headers(token, second))
    assert r.status_code == 401
    me = await client.get("/v1/users/me", headers={"Authorization": f"Bearer {new_access}"})
    assert me.status_code == 401


async def test_refresh_without_a_cookie_is_401(client: httpx.AsyncClient) -> None:
    token = await csrf(client)
    r = await client.post("/console/session/refresh", headers=headers(token))
    assert r.status_code == 401
    assert r.json() == {"error": "Unauthorized", "detail": "You are not logged in"}
    r = await client.post("/console/session/refresh", headers=headers(token, "not-a-jwt"))
    assert r.status_code == 401
    assert set_cookies(r)[REFRESH][0].value == ""


async def test_logout_ends_the_session_and_clears_the_cookie(
    client: httpx.AsyncClient, app: Any
) -> None:
    user = await create_user(app)
    token, access, refresh = await console_login(client, user.email)
    r = await client.post("/console/session/logout", headers=headers(token, refresh))
    assert r.status_code == 204
    morsel, _ = set_cookies(r)[REFRESH]
    assert morsel.value == "" and int(morsel["max-age"]) == 0
    assert morsel["path"] == "/console/session"
    me = await client.get("/v1/users/me", headers={"Authorization": f"Bearer {access}"})
    assert me.status_code == 401
    r = await client.post("/console/session/refresh", headers=headers(token, refresh))
    assert r.status_code == 401
    # Logging out again, or without a session, is harmless.
    r = await client.post("/console/session/logout", headers=headers(token))
    assert r.status_code == 204


async def test_login_errors_are_the_api_s(client: httpx.AsyncClient, app: Any) -> None:
    token = await csrf(client)
    r = await client.post(
        "/console/session/login", json={"username": " ", "password": ""}, headers=headers(token)
    )
    assert r.status_code == 422
    detail = {tuple(d["loc"]): d["msg"] for d in r.json()["detail"]}
    assert detail == {
        ("body", "username"): "Enter your e-mail address",
        ("body", "password"): "Enter your password",
    }
    user = await create_user(app)
    r = await client.post(
        "/console/session/login",
        json={"username": user.email, "password": "wrong password here"},
        headers=headers(token),
    )
    assert r.status_code == 401
    assert r.json()["detail"] == "Incorrect e-mail address or password"
    assert REFRESH not in set_cookies(r)
    unverified = await create_user(app, verified=False)
    r = await client.post(
        "/console/session/login",
        json={"username": unverified.email, "password": DEFAULT_PASSWORD},
        headers=headers(token),
    )
    # Not verified: the same answer as a wrong password (and a new link by mail).
    assert r.status_code == 401
    assert r.json()["detail"] == "Incorrect e-mail address or password"
    assert REFRESH not in set_cookies(r)


async def test_console_login_shares_the_api_login_limit(
    client: httpx.AsyncClient, app: Any
) -> None:
    user = await create_user(app)
    for _ in range(10):
        r = await client.post(
            "/v1/auth/login", data={"username": user.email, "password": "wrong password here"}
        )
        assert r.status_code == 401
    token = await csrf(client)
    r = await client.post(
        "/console/session/login",
        json={"username": user.email, "password": DEFAULT_PASSWORD},
        headers=headers(token),
    )
    assert r.status_code == 429
    assert "retry-after" in r.headers
