"""The whole account journey through HTTP, real MariaDB, Redis, pgvector, Celery worker and SMTP.

register → verify from the mail → login → refresh → reuse of the old refresh token kills the
session → invite a colleague → they register through the mail and join → role change → transfer
ownership → export arrives → delete account → their solely owned tenant's data is gone.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from typing import Any

import httpx

from atrium.kit.blobstore import get_blobstore, tenant_prefix
from atrium.kit.vectordb import ensure_tenant_partition
from tests.support.accounts import (
    PASSWORD,
    bearer,
    eventually,
    link_token,
    login,
    new_email,
    partition_exists,
    register,
    tenant_row_count,
    verify_from_mail,
    wait_mail,
)


async def test_the_whole_account_journey(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any, settings: Any
) -> None:
    alice = new_email("alice")

    # Register: the user and a tenant they own (its vector partition comes with its first
    # upload; created here as that upload would).
    r = await register(client, alice, name="Alice", tenant_name="Alice & Co")
    assert r.status_code == 201, r.text
    shared = r.json()["tenant"]
    assert shared["name"] == "Alice & Co" and shared["role"] == "owner"
    assert r.json()["user"]["is_verified"] is False
    assert not await partition_exists(settings, shared["id"])
    async with app.state.vector_pool.connection() as conn:
        await ensure_tenant_partition(conn, uuid.UUID(shared["id"]))

    # Not verified yet: login fails as a wrong password would (saying so would tell whether
    # a sign-up with this address made an account) and mails a new verification link.
    r = await login(client, alice)
    assert r.status_code == 401
    assert r.json()["detail"] == "Incorrect e-mail address or password"

    # Verify from the mail, then log in.
    await verify_from_mail(client, mailbox, alice)
    r = await login(client, alice, **{"User-Agent": "journey-laptop"})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["token_type"] == "bearer" and first["expires_in"] == 900

    # Refresh: a new pair; the old refresh token is spent.
    r = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await client.get("/v1/users/me", headers=bearer(second["access_token"]))).is_success

    # Replaying the spent refresh token kills the whole session, new tokens included.
    r = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401
    assert "already used" in r.json()["detail"]
    r = await client.get("/v1/users/me", headers=bearer(second["access_token"]))
    assert r.status_code == 401
    r = await client.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401

    # Log in again on a fresh session.
    r = await login(client, alice)
    assert r.status_code == 200
    a = bearer(r.json()["access_token"])

    # Invite a colleague; they register through the link in the mail and join.
    bob = new_email("bob")
    r = await client.post(
        f"/v1/tenants/{shared['id']}/invitations", json={"email": bob, "role": "member"}, headers=a
    )
    assert r.status_code == 201, r.text
    invitation = await wait_mail(mailbox, bob, "invited you to Alice & Co")
    token = link_token(invitation, "/invitations/accept")
    r = await register(client, bob, name="Bob", invitation_token=token)
    assert r.status_code == 201, r.text
    assert r.json()["tenant"] == {**shared, "role": "member"}
    assert r.json()["user"]["is_verified"] is True  # the invitation mail proved the address
    r = await login(client, bob)
    assert r.status_code == 200
    b = bearer(r.json()["access_token"])
    bob_id = (await client.get("/v1/users/me", headers=b)).json()["id"]
    tenants = (await client.get("/v1/tenants", headers=b)).json()
    assert [(t["id"], t["role"]) for t in tenants["items"]] == [(shared["id"], "member")]
    # The link works once.
    r = await register(client, new_email(), invitation_token=token)
    assert r.status_code == 410

    # Role change.
    r = await client.patch(
        f"/v1/tenants/{shared['id']}/members/{bob_id}", json={"role": "admin"}, headers=a
    )
    assert r.status_code == 200 and r.json()["role"] == "admin"

    # Transfer ownership: Bob owns the tenant, Alice becomes an admin.
    r = await client.post(
        f"/v1/tenants/{shared['id']}/transfer-ownership", json={"user_id": bob_id}, headers=a
    )
    assert r.status_code == 200, r.text
    members = (await client.get(f"/v1/tenants/{shared['id']}/members", headers=b)).json()
    assert {m["email"]: m["role"] for m in members["items"]} == {bob: "owner", alice: "admin"}

    # Alice has a tenant of her own, with vectors, files and cache keys.
    r = await client.post("/v1/tenants", json={"name": "Alice Solo"}, headers=a)
    assert r.status_code == 201
    solo = r.json()["id"]
    async with app.state.vector_pool.connection() as conn:  # as its first upload would
        await ensure_tenant_partition(conn, uuid.UUID(solo))
    assert await partition_exists(settings, solo)
    await get_blobstore(settings).put(f"{tenant_prefix(solo)}doc/raw.txt", b"hello")
    await app.state.redis.set(f"atrium:t:{solo}:cache:x", "1")

    # Export: a mail arrives with a signed link to a ZIP of her data.
    r = await client.post("/v1/users/me/export", headers=a)
    assert r.status_code == 202
    export_id = r.json()["id"]
    ready = await wait_mail(mailbox, alice, "data export is ready")
    link = next(u for u in ready.links() if "/download" in u)
    r = await client.get(link.removeprefix("http://testserver"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = set(zf.namelist())
        profile = json.loads(zf.read("profile.json"))
        memberships = json.loads(zf.read("memberships.json"))
    assert profile["email"] == alice
    assert {m["tenant_name"]: m["role"] for m in memberships} == {
        "Alice & Co": "admin",
        "Alice Solo": "owner",
    }
    assert f"tenants/{solo}/tenant.json" in names
    assert not any(n.startswith(f"tenants/{shared['id']}/") for n in names)  # not hers to export
    r = await client.get(f"/v1/users/me/exports/{export_id}", headers=a)
    assert r.json()["status"] == "ready" and r.json()["download_url"]

    # Delete the account: her own tenant is purged everywhere; the shared one stays with Bob.
    r = await client.request("DELETE", "/v1/users/me", json={"password": PASSWORD}, headers=a)
    assert r.status_code == 202, r.text
    await wait_mail(mailbox, alice, "account was deleted")
    assert (await client.get("/v1/users/me", headers=a)).status_code == 401

    async def solo_gone() -> bool:
        return await tenant_row_count(app, solo) == 0

    await eventually(solo_gone, what="the solo tenant's rows to be purged")
    assert not await partition_exists(settings, solo)
    assert await app.state.redis.get(f"atrium:t:{solo}:cache:x") is None
    try:
        await get_blobstore(settings).get(f"{tenant_prefix(solo)}doc/raw.txt")
        raise AssertionError("the tenant's blob survived the purge")
    except FileNotFoundError:
        pass
    assert await partition_exists(settings, shared["id"])
    members = (await client.get(f"/v1/tenants/{shared['id']}/members", headers=b)).json()
    assert [m["email"] for m in members["items"]] == [bob]
    r = await login(client, alice)
    assert r.status_code == 401

    # The audit log tells the story.
    events = (await client.get(f"/v1/tenants/{shared['id']}/audit-events", headers=b)).json()
    actions = {e["action"] for e in events["items"]}
    assert {
        "tenant.created",
        "invitation.created",
        "invitation.accepted",
        "member.role_changed",
        "tenant.ownership_transferred",
    } <= actions
    assert uuid.UUID(events["items"][0]["id"])
