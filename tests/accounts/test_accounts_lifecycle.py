"""Passwords (change, forgot, reset), e-mail changes, exports, account deletion and rate limits."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
from sqlalchemy import update

from atrium.kit.blobstore import get_blobstore
from atrium.models import DataExport, Role
from tests.support.accounts import (
    PASSWORD,
    bearer,
    eventually,
    link_token,
    login,
    new_email,
    partition_exists,
    register,
    signup,
    tenant_row_count,
    wait_mail,
)

NEW_PASSWORD = "another sturdy passphrase 5"


# Password change ---------------------------------------------------------------------------


async def test_password_change_ends_other_sessions(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    other = (await login(client, me["email"])).json()
    url = "/v1/users/me/password"

    r = await client.post(
        url,
        json={"current_password": "wrong one!!", "new_password": NEW_PASSWORD},
        headers=me["headers"],
    )
    assert r.status_code == 403 and "incorrect" in r.json()["detail"]
    r = await client.post(
        url,
        json={"current_password": PASSWORD, "new_password": "1234567890"},
        headers=me["headers"],
    )
    assert r.status_code == 422 and r.json()["detail"]["rule"] == "not_common"
    assert r.json()["detail"]["field"] == "new_password"
    r = await client.post(
        url, json={"current_password": PASSWORD, "new_password": "short"}, headers=me["headers"]
    )
    assert r.status_code == 422 and r.json()["detail"]["rule"] == "min_length"
    r = await client.post(url, json={"current_password": PASSWORD}, headers=me["headers"])
    assert r.status_code == 422

    r = await client.post(
        url,
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=me["headers"],
    )
    assert r.status_code == 200, r.text
    assert "1 other session" in r.json()["detail"]
    # This session goes on; the other one ended at once.
    assert (await client.get("/v1/users/me", headers=me["headers"])).is_success
    assert (
        await client.get("/v1/users/me", headers=bearer(other["access_token"]))
    ).status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
    assert r.status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": me["tokens"]["refresh_token"]})
    assert r.status_code == 200
    assert (await login(client, me["email"])).status_code == 401
    assert (await login(client, me["email"], NEW_PASSWORD)).status_code == 200


# Forgot and reset --------------------------------------------------------------------------


async def test_forgot_and_reset_password(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    known = await client.post("/v1/auth/forgot-password", json={"email": me["email"]})
    unknown = await client.post("/v1/auth/forgot-password", json={"email": new_email()})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    assert (await client.post("/v1/auth/forgot-password", json={"email": "x"})).status_code == 422

    mail = await wait_mail(mailbox, me["email"], "Reset your Atrium password")
    assert "60 minutes" in mail.text
    token = link_token(mail, "/reset-password")

    r = await client.post(
        "/v1/auth/reset-password", json={"token": "bogus", "password": NEW_PASSWORD}
    )
    assert r.status_code == 400
    r = await client.post("/v1/auth/reset-password", json={"token": token, "password": "short"})
    assert r.status_code == 422 and r.json()["detail"]["rule"] == "min_length"
    r = await client.post("/v1/auth/reset-password", json={"token": token, "password": me["email"]})
    assert r.status_code == 422 and r.json()["detail"]["rule"] == "not_email"

    r = await client.post(
        "/v1/auth/reset-password", json={"token": token, "password": NEW_PASSWORD}
    )
    assert r.status_code == 200, r.text
    # Every session ended; the token works once.
    assert (await client.get("/v1/users/me", headers=me["headers"])).status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": me["tokens"]["refresh_token"]})
    assert r.status_code == 401
    r = await client.post(
        "/v1/auth/reset-password", json={"token": token, "password": "yet another passphrase 6"}
    )
    assert r.status_code == 400
    assert (await login(client, me["email"], NEW_PASSWORD)).status_code == 200


# E-mail change -----------------------------------------------------------------------------


async def test_email_change_takes_effect_when_verified(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    taken = await signup(client, mailbox)
    url = "/v1/users/me/email"
    new = new_email("moved")

    r = await client.post(
        url, json={"new_email": new, "password": "wrong pass!"}, headers=me["headers"]
    )
    assert r.status_code == 403
    r = await client.post(
        url, json={"new_email": me["email"], "password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 422
    r = await client.post(
        url, json={"new_email": "nope", "password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 422
    # An address that has an account gets the same answer (and no mail).
    r_taken = await client.post(
        url, json={"new_email": taken["email"], "password": PASSWORD}, headers=me["headers"]
    )
    r = await client.post(url, json={"new_email": new, "password": PASSWORD}, headers=me["headers"])
    assert r.status_code == r_taken.status_code == 202
    assert r.json() == r_taken.json()

    notice = await wait_mail(mailbox, me["email"], "about to change")
    assert new in notice.text
    mail = await wait_mail(mailbox, new, "Confirm your new e-mail")
    assert not [m for m in mailbox.all(taken["email"]) if "Confirm your new" in m.subject]
    # Nothing changed yet.
    assert (await client.get("/v1/users/me", headers=me["headers"])).json()["email"] == me["email"]

    token = link_token(mail, "/verify-email")
    r = await client.post("/v1/auth/verify", json={"token": token})
    assert r.status_code == 200 and r.json()["email"] == new
    assert (await client.post("/v1/auth/verify", json={"token": token})).status_code == 400
    assert (await login(client, me["email"])).status_code == 401
    assert (await login(client, new)).status_code == 200


async def test_email_change_refused_when_the_address_was_taken_meanwhile(
    client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    me = await signup(client, mailbox)
    new = new_email("race")
    r = await client.post(
        "/v1/users/me/email", json={"new_email": new, "password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 202
    mail = await wait_mail(mailbox, new, "Confirm your new e-mail")
    assert (await register(client, new)).status_code == 201
    r = await client.post("/v1/auth/verify", json={"token": link_token(mail, "/verify-email")})
    assert r.status_code == 409


# Account deletion --------------------------------------------------------------------------


async def test_delete_account_refused_while_sole_owner_of_a_shared_tenant(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any, settings: Any
) -> None:
    from atrium.kit.vectordb import ensure_tenant_partition
    from tests.support.factories import add_member, create_user

    me = await signup(client, mailbox, tenant_name="Shared Co")
    async with app.state.vector_pool.connection() as conn:  # as its first upload would
        await ensure_tenant_partition(conn, uuid.UUID(me["tenant"]["id"]))
    colleague = await create_user(app)
    from atrium.models import Tenant

    async with app.state.sessionmaker() as s:
        tenant = await s.get(Tenant, uuid.UUID(me["tenant"]["id"]))
    await add_member(app, tenant, colleague, Role.member)

    r = await client.request(
        "DELETE", "/v1/users/me", json={"password": "wrong!!"}, headers=me["headers"]
    )
    assert r.status_code == 403
    r = await client.request("DELETE", "/v1/users/me", json={}, headers=me["headers"])
    assert r.status_code == 422
    r = await client.request(
        "DELETE", "/v1/users/me", json={"password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 409
    assert r.json()["detail"]["tenants"] == ["Shared Co"]
    # Still there.
    assert (await client.get("/v1/users/me", headers=me["headers"])).is_success
    assert await partition_exists(settings, me["tenant"]["id"])

    # Once someone else owns it, deletion goes through and the tenant stays.
    r = await client.post(
        f"/v1/tenants/{tenant.id}/transfer-ownership",
        json={"user_id": str(colleague.id)},
        headers=me["headers"],
    )
    assert r.status_code == 200
    r = await client.request(
        "DELETE", "/v1/users/me", json={"password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 202
    await wait_mail(mailbox, me["email"], "account was deleted")
    assert await tenant_row_count(app, tenant.id) > 0
    assert await partition_exists(settings, tenant.id)


async def test_delete_account_purges_sole_tenants_everywhere(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any, settings: Any
) -> None:
    from atrium.kit.vectordb import ensure_tenant_partition, partition_name

    me = await signup(client, mailbox)
    tid = me["tenant"]["id"]
    # Data in every store: a chunk in the partition, a blob, a cache key, an export file.
    import psycopg

    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        await ensure_tenant_partition(conn, uuid.UUID(tid))  # as its first upload would
        await conn.execute(
            f"INSERT INTO {partition_name(uuid.UUID(tid))} (tenant_id, id, collection_id, "
            "document_id, ordinal, text, embedding) VALUES (%s, %s, %s, %s, 0, 'hi', %s)",
            (tid, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), "[" + ",".join(["0.1"] * 384) + "]"),
        )
        await conn.commit()
    blobs = get_blobstore(settings)
    await blobs.put(f"tenants/{tid}/x.bin", b"x")
    await app.state.redis.set(f"atrium:t:{tid}:anything", "1")
    await app.state.redis.set("atrium:unrelated", "1")
    user_id = me["user"]["id"]
    await blobs.put(f"exports/{user_id}/old.zip", b"zip")

    r = await client.request(
        "DELETE", "/v1/users/me", json={"password": PASSWORD}, headers=me["headers"]
    )
    assert r.status_code == 202, r.text
    # Gone for its members at once (the tenant is marked deleting before the purge runs).
    assert (await client.get("/v1/users/me", headers=me["headers"])).status_code == 401

    async def purged() -> bool:
        return await tenant_row_count(app, tid) == 0 and not await partition_exists(settings, tid)

    await eventually(purged, what="tenant purge")
    assert await app.state.redis.get(f"atrium:t:{tid}:anything") is None
    assert await app.state.redis.get("atrium:unrelated") == "1"

    async def files_gone() -> bool:
        try:
            await blobs.get(f"exports/{user_id}/old.zip")
        except FileNotFoundError:
            pass
        else:
            return False
        try:
            await blobs.get(f"tenants/{tid}/x.bin")
        except FileNotFoundError:
            return True
        return False

    await eventually(files_gone, what="stored files to be deleted")
    await wait_mail(mailbox, me["email"], "account was deleted")


# Export ------------------------------------------------------------------------------------


async def test_export_status_link_and_errors(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any, settings: Any
) -> None:
    me = await signup(client, mailbox)
    tid = me["tenant"]["id"]
    r = await client.post("/v1/users/me/export", headers=me["headers"])
    assert r.status_code == 202
    export = r.json()
    assert export["status"] == "pending" and export["download_url"] is None

    async def ready() -> bool:
        r = await client.get(f"/v1/users/me/exports/{export['id']}", headers=me["headers"])
        return bool(r.json()["status"] == "ready")

    await eventually(ready, what="the export")
    r = await client.get(f"/v1/users/me/exports/{export['id']}", headers=me["headers"])
    body = r.json()
    assert body["size_bytes"] > 0 and body["download_expires_at"]
    url = urlparse(body["download_url"])
    assert url.netloc == "testserver"
    r = await client.get(f"{url.path}?{url.query}")
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
        assert {"profile.json", "memberships.json", f"tenants/{tid}/tenant.json"} <= names
        for name in names:
            text = zf.read(name).decode()
            assert "argon2" not in text and "hashed_password" not in text
            json.loads(text)
    await wait_mail(mailbox, me["email"], "data export is ready")

    # Tampered, expired and foreign links.
    q = parse_qs(url.query)
    expires, sig = q["expires"][0], q["signature"][0]
    bad = await client.get(f"{url.path}?expires={expires}&signature={'0' * 64}")
    assert bad.status_code == 403
    later = await client.get(f"{url.path}?expires={int(expires) + 1}&signature={sig}")
    assert later.status_code == 403
    from atrium.accounts.exports import _signature

    past = int(time.time()) - 10
    old_sig = _signature(settings.secret_keys[0], uuid.UUID(export["id"]), past)
    r = await client.get(f"{url.path}?expires={past}&signature={old_sig}")
    assert r.status_code == 410
    r = await client.get(url.path)
    assert r.status_code == 422
    stranger = await signup(client, mailbox)
    r = await client.get(f"/v1/users/me/exports/{export['id']}", headers=stranger["headers"])
    assert r.status_code == 404
    r = await client.get(f"/v1/users/me/exports/{uuid.uuid4()}", headers=me["headers"])
    assert r.status_code == 404

    # A stored file that went missing is 410, not a crash.
    async with app.state.sessionmaker() as s:
        await s.execute(
            update(DataExport)
            .where(DataExport.id == uuid.UUID(export["id"]))
            .values(blob_key="exports/missing.zip")
        )
        await s.commit()
    r = await client.get(f"{url.path}?{url.query}")
    assert r.status_code == 410


async def test_export_includes_owned_tenant_tables_without_secrets(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    """Every table with a tenant_id lands in the ZIP, minus hash/secret columns."""
    from atrium.accounts.exports import _tenant_tables

    me = await signup(client, mailbox)
    tid = me["tenant"]["id"]
    r = await client.post("/v1/users/me/export", headers=me["headers"])
    mail = await wait_mail(mailbox, me["email"], "data export is ready")
    link = next(u for u in mail.links() if "/download" in u)
    r = await client.get(link.removeprefix("http://testserver"))
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
    for table in _tenant_tables():
        assert f"tenants/{tid}/{table.name}.json" in names
    assert f"tenants/{tid}/audit_events.json" not in names


# Rate limits -------------------------------------------------------------------------------


async def test_login_is_rate_limited_per_email_and_per_ip(
    app: Any, client: httpx.AsyncClient
) -> None:
    victim = new_email()
    for _ in range(10):
        assert (await login(client, victim, "wrong password 1")).status_code == 401
    r = await login(client, victim, "wrong password 1")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["detail"]["retry_after"] == int(r.headers["retry-after"])
    # Another address from the same client is not locked out by the victim's bucket.
    assert (await login(client, new_email(), "wrong password 1")).status_code == 401
    # The victim from another address is still limited (per e-mail).
    transport = httpx.ASGITransport(app=app, client=("10.9.8.7", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
        assert (await login(other, victim, "wrong password 1")).status_code == 429
        # Per IP: 20 a minute from one address, whatever the e-mails.
        codes = [
            (await login(other, new_email(), "wrong password 1")).status_code for _ in range(20)
        ]
        assert codes.count(429) >= 1 and codes[0] == 401


async def test_register_forgot_and_verify_are_rate_limited(client: httpx.AsyncClient) -> None:
    email = new_email()
    codes = [
        (await client.post("/v1/auth/forgot-password", json={"email": email})).status_code
        for _ in range(6)
    ]
    assert codes == [202] * 5 + [429]
    codes = [
        (await client.post("/v1/auth/request-verify-token", json={"email": email})).status_code
        for _ in range(6)
    ]
    assert codes == [202] * 5 + [429]
    r = await client.post("/v1/auth/request-verify-token", json={"email": email})
    assert r.status_code == 429 and "retry-after" in r.headers
    codes = [(await register(client, email, "short")).status_code for _ in range(6)]
    assert codes == [422] * 5 + [429]
