"""Registration, verification, login, tokens and sessions, through HTTP and the real services."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from atrium.models import AuditEvent, User
from tests.support.accounts import (
    PASSWORD,
    bearer,
    link_token,
    login,
    new_email,
    register,
    signup,
    wait_mail,
)


async def _audit(app: Any, action: str) -> list[AuditEvent]:
    async with app.state.sessionmaker() as s:
        return list(
            (await s.execute(select(AuditEvent).where(AuditEvent.action == action))).scalars()
        )


# Registration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "rule"),
    [
        ("short1!", "min_length"),
        ("x" * 257, None),  # schema max length: a plain validation error
        ("qwertyuiop", "not_common"),
        ("Password123", "not_common"),
        ("EMAIL", "not_email"),
    ],
)
async def test_register_rejects_weak_passwords_naming_the_rule(
    client: httpx.AsyncClient, password: str, rule: str | None
) -> None:
    email = new_email()
    if password == "EMAIL":
        password = email.upper()
    r = await register(client, email, password)
    assert r.status_code == 422, r.text
    if rule is not None:
        detail = r.json()["detail"]
        assert detail["rule"] == rule and detail["field"] == "password"
        assert detail["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-address", "password": PASSWORD},
        {"password": PASSWORD},
        {"email": "a@example.com"},
        {"email": "a@example.com", "password": PASSWORD, "tenant_name": "   "},
        {"email": "a@example.com", "password": PASSWORD, "name": "n" * 201},
    ],
)
async def test_register_rejects_malformed_bodies(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await client.post("/v1/auth/register", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "ValidationError"


def _shape(value: Any) -> Any:
    """Keys and value types, recursively: what tells two answers apart besides their values."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


async def test_register_creates_owned_tenant(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    email = new_email()
    r = await register(client, email.upper(), name="Dana")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["user"]["email"] == email  # addresses are stored lower-cased
    assert body["tenant"]["name"] == "Dana's workspace" and body["tenant"]["role"] == "owner"
    await wait_mail(mailbox, email, "Verify your e-mail")


async def _drain_worker() -> None:
    """Wait until the worker has run every job sent before now (one solo process, in order)."""
    from atrium.worker import celery_app

    result = celery_app.send_task("atrium.ping", kwargs={"payload": "drain"})
    await asyncio.to_thread(result.get, timeout=60)


async def test_register_does_not_reveal_registered_addresses(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    """Signing up with a taken address answers like a new one; the owner is told by mail."""
    taken, fresh = new_email(), new_email()
    assert (await register(client, taken, name="Dana")).status_code == 201
    await wait_mail(mailbox, taken, "Verify your e-mail")
    probe = {"name": "Mallory", "tenant_name": "Probe"}
    again = await register(client, taken.upper(), "another long passphrase 42", **probe)
    new = await register(client, fresh, "another long passphrase 42", **probe)
    assert again.status_code == new.status_code == 201, again.text
    assert _shape(again.json()) == _shape(new.json())
    assert again.headers.keys() == new.headers.keys()
    for r, email in ((again, taken), (new, fresh)):
        body = r.json()
        assert body["user"]["email"] == email and body["user"]["name"] == "Mallory"
        assert body["user"]["is_verified"] is False
        assert body["tenant"]["name"] == "Probe" and body["tenant"]["role"] == "owner"
        assert body["tenant"]["plan"] == "free" and body["tenant"]["status"] == "active"
    # The owner learns of the attempt; the account and its password are untouched.
    notice = await wait_mail(mailbox, taken, "tried to sign up")
    assert "http://testserver/forgot-password" in notice.links()
    assert "http://testserver/login" in notice.links()
    # A second verification mail was not sent for the attempt: every mail job sent before a
    # later marker job has run (the worker runs jobs in order), and there are two mails.
    await _drain_worker()
    assert len(mailbox.all(taken)) == 2
    r = await login(client, taken, "another long passphrase 42")
    assert r.status_code == 401


async def test_register_answer_timestamps_do_not_reveal_registered_addresses(
    client: httpx.AsyncClient,
) -> None:
    """A real sign-up stores the user, then the tenant: the tenant is younger. The answer for
    a taken address must not give itself away with one timestamp for both (review H4a)."""
    taken = new_email()
    assert (await register(client, taken)).status_code == 201
    again = await register(client, taken, "another long passphrase 42")
    new = await register(client, new_email(), "another long passphrase 42")
    for r in (again, new):
        assert r.status_code == 201, r.text
        body = r.json()
        user_at = dt.datetime.fromisoformat(body["user"]["created_at"])
        tenant_at = dt.datetime.fromisoformat(body["tenant"]["created_at"])
        assert user_at < tenant_at, body
        assert tenant_at - user_at < dt.timedelta(seconds=30)


async def test_register_with_unknown_or_foreign_invitation(client: httpx.AsyncClient) -> None:
    r = await register(client, new_email(), invitation_token="x" * 40)
    assert r.status_code == 404


# Verification ------------------------------------------------------------------------------


async def test_verification_errors_and_resend(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    email = new_email()
    assert (await register(client, email)).status_code == 201
    r = await client.post("/v1/auth/verify", json={"token": "garbage"})
    assert r.status_code == 400
    assert "invalid or has expired" in r.json()["detail"]
    r = await client.post("/v1/auth/verify", json={})
    assert r.status_code == 422

    # Asking again sends a second mail; an unknown address gets the same answer and no mail.
    r = await client.post("/v1/auth/request-verify-token", json={"email": email})
    assert r.status_code == 202
    unknown = await client.post("/v1/auth/request-verify-token", json={"email": new_email()})
    assert unknown.status_code == 202 and unknown.json() == r.json()
    r = await client.post("/v1/auth/request-verify-token", json={"email": "nope"})
    assert r.status_code == 422

    mail = await wait_mail(mailbox, email, "Verify your e-mail", count=2)
    token = link_token(mail, "/verify-email")
    assert (await client.post("/v1/auth/verify", json={"token": token})).status_code == 200
    r = await client.post("/v1/auth/verify", json={"token": token})
    assert r.status_code == 409
    assert "already verified" in r.json()["detail"]
    assert await _audit(app, "user.verified")


# Login -------------------------------------------------------------------------------------


async def test_login_failures_are_uniform_and_audited(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    wrong = await login(client, me["email"], "not the password at all")
    unknown = await login(client, new_email(), "not the password at all")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.headers["www-authenticate"] == "Bearer"
    r = await client.post("/v1/auth/login", data={"username": me["email"]})
    assert r.status_code == 422
    failed = await _audit(app, "auth.login_failed")
    assert {e.data.get("email") for e in failed} >= {me["email"]}
    assert all(e.ip == "127.0.0.1" for e in failed)
    assert await _audit(app, "auth.login")


async def test_login_does_not_tell_a_new_address_from_a_registered_one(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    """Anyone may sign up with any address and a password of their choosing, then log in with
    both: a new address (an account now, unverified) and a registered one (another password)
    must answer alike (review H4b). The unverified account gets a new verification link,
    at most three an hour, silently beyond."""
    taken, fresh = new_email(), new_email()
    await signup(client, mailbox, taken)
    guess = "the prober's own passphrase 7"
    for email in (taken, fresh):
        assert (await register(client, email, guess)).status_code == 201
    await wait_mail(mailbox, fresh, "Verify your e-mail")

    registered = await login(client, taken, guess)
    unverified = await login(client, fresh, guess)
    wrong = await login(client, fresh, "not the password at all")
    assert registered.status_code == unverified.status_code == wrong.status_code == 401
    assert registered.json() == unverified.json() == wrong.json()
    assert registered.headers.keys() == unverified.headers.keys()
    assert unverified.headers["www-authenticate"] == "Bearer"

    # The owner of the new address gets a new link, which works.
    mail = await wait_mail(mailbox, fresh, "Verify your e-mail", count=2)
    for _ in range(3):
        assert (await login(client, fresh, guess)).status_code == 401
    await wait_mail(mailbox, fresh, "Verify your e-mail", count=4)
    async with app.state.sessionmaker() as s:
        user_id = await s.scalar(select(User.id).where(User.email == fresh))
    failed = [e for e in await _audit(app, "auth.login_failed") if e.actor_user_id == user_id]
    assert sorted(e.data["verification_mailed"] for e in failed) == [False] + [True] * 3
    assert all(e.data["reason"] == "unverified" for e in failed)
    # The silent limit is its own: asking for a link by address still works.
    r = await client.post("/v1/auth/request-verify-token", json={"email": fresh})
    assert r.status_code == 202
    r = await client.post("/v1/auth/verify", json={"token": link_token(mail, "/verify-email")})
    assert r.status_code == 200, r.text
    assert (await login(client, fresh, guess)).status_code == 200


# Tokens and sessions -----------------------------------------------------------------------


async def test_refresh_rejects_bad_tokens(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    r = await client.post("/v1/auth/refresh", json={"refresh_token": "nope"})
    assert r.status_code == 401
    # An access token is not a refresh token.
    r = await client.post("/v1/auth/refresh", json={"refresh_token": me["tokens"]["access_token"]})
    assert r.status_code == 401
    # Nor is a refresh token an access token.
    r = await client.get("/v1/users/me", headers=bearer(me["tokens"]["refresh_token"]))
    assert r.status_code == 401
    assert (await client.post("/v1/auth/refresh", json={})).status_code == 422


async def test_logout_ends_this_session_at_once(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    other = (await login(client, me["email"])).json()
    r = await client.post("/v1/auth/logout", headers=me["headers"])
    assert r.status_code == 204
    assert (await client.get("/v1/users/me", headers=me["headers"])).status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": me["tokens"]["refresh_token"]})
    assert r.status_code == 401
    # The other session is untouched.
    assert (await client.get("/v1/users/me", headers=bearer(other["access_token"]))).is_success
    assert (await client.post("/v1/auth/logout")).status_code == 401


async def test_logout_all_and_session_management(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    laptop = (await login(client, me["email"], **{"User-Agent": "laptop/1.0"})).json()
    phone = (await login(client, me["email"], **{"User-Agent": "phone/2.0"})).json()

    r = await client.get("/v1/users/me/sessions", headers=bearer(laptop["access_token"]))
    assert r.status_code == 200
    page = r.json()
    assert page["total"] == 3
    devices = {s["device"]: s for s in page["items"]}
    assert devices["laptop/1.0"]["current"] is True and devices["phone/2.0"]["current"] is False
    assert devices["phone/2.0"]["ip"] == "127.0.0.1"
    assert {"created_at", "last_used_at"} <= set(devices["phone/2.0"])

    # Sign the phone out from the laptop.
    phone_id = devices["phone/2.0"]["id"]
    r = await client.delete(
        f"/v1/users/me/sessions/{phone_id}", headers=bearer(laptop["access_token"])
    )
    assert r.status_code == 204
    assert (
        await client.get("/v1/users/me", headers=bearer(phone["access_token"]))
    ).status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": phone["refresh_token"]})
    assert r.status_code == 401
    # Gone, unknown and other people's sessions are 404.
    r = await client.delete(
        f"/v1/users/me/sessions/{phone_id}", headers=bearer(laptop["access_token"])
    )
    assert r.status_code == 404
    stranger = await signup(client, mailbox)
    laptop_id = devices["laptop/1.0"]["id"]
    r = await client.delete(f"/v1/users/me/sessions/{laptop_id}", headers=stranger["headers"])
    assert r.status_code == 404
    r = await client.delete("/v1/users/me/sessions/not-a-uuid", headers=me["headers"])
    assert r.status_code == 422
    assert await _audit(app, "session.revoked")

    # Log out everywhere.
    assert (await client.post("/v1/auth/logout-all", headers=me["headers"])).status_code == 204
    for tokens in (me["tokens"], laptop):
        h = bearer(tokens["access_token"])
        assert (await client.get("/v1/users/me", headers=h)).status_code == 401
        r = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert r.status_code == 401
    # The stranger is untouched.
    assert (await client.get("/v1/users/me", headers=stranger["headers"])).is_success


async def test_session_list_is_paginated(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    for _ in range(2):
        assert (await login(client, me["email"])).status_code == 200
    r = await client.get("/v1/users/me/sessions?page=2&size=2", headers=me["headers"])
    assert r.status_code == 200
    assert r.json()["total"] == 3 and len(r.json()["items"]) == 1 and r.json()["page"] == 2
    r = await client.get("/v1/users/me/sessions?size=1000", headers=me["headers"])
    assert r.status_code == 422


# Profile -----------------------------------------------------------------------------------


async def test_profile_read_and_update(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    r = await client.get("/v1/users/me", headers=me["headers"])
    assert r.status_code == 200 and r.json()["email"] == me["email"]
    assert "hashed_password" not in r.json()
    r = await client.patch("/v1/users/me", json={"name": "  Erin  "}, headers=me["headers"])
    assert r.status_code == 200 and r.json()["name"] == "Erin"
    r = await client.patch("/v1/users/me", json={"name": "x" * 201}, headers=me["headers"])
    assert r.status_code == 422
    r = await client.patch("/v1/users/me", json={}, headers=me["headers"])
    assert r.status_code == 422
    assert (await client.get("/v1/users/me")).status_code == 401
    r = await client.get("/v1/users/me", headers={"Authorization": "Bearer atr_x"})
    assert r.status_code == 403

    r = await client.delete(f"/v1/users/me/sessions/{uuid.uuid4()}", headers=me["headers"])
    assert r.status_code == 404


async def test_disabled_account_and_expired_mail_tokens(
    app: Any, client: httpx.AsyncClient
) -> None:
    from fastapi_users.jwt import generate_jwt

    from atrium.models import User
    from tests.support.factories import create_user

    user = await create_user(app, password=PASSWORD)
    async with app.state.sessionmaker() as s:
        u = await s.get(User, user.id)
        assert u is not None
        u.is_active = False
        await s.commit()
    r = await login(client, user.email)
    assert r.status_code == 403 and "disabled" in r.json()["detail"]

    secret = app.state.settings.secret_key.get_secret_value()
    expired_verify = generate_jwt(
        {"sub": str(user.id), "email": user.email, "aud": "fastapi-users:verify"}, secret, -10
    )
    r = await client.post("/v1/auth/verify", json={"token": expired_verify})
    assert r.status_code == 400
    expired_reset = generate_jwt(
        {"sub": str(user.id), "password_fgpt": "x", "aud": "fastapi-users:reset"}, secret, -10
    )
    r = await client.post(
        "/v1/auth/reset-password", json={"token": expired_reset, "password": PASSWORD + "!"}
    )
    assert r.status_code == 400
    forged = generate_jwt(
        {
            "sub": str(user.id),
            "old": user.email,
            "new": "x@example.com",
            "aud": "atrium:email-change",
        },
        "not-our-secret-not-our-secret-not-our-secret",
        3600,
    )
    assert (await client.post("/v1/auth/verify", json={"token": forged})).status_code == 400
