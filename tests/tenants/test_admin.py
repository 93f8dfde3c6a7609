"""Superuser routes: search users and tenants, suspend and restore a tenant."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from atrium.models import Role
from tests.support.apikeys import create_api_key, key_header
from tests.support.factories import add_member, bearer, create_tenant, create_user


async def test_only_superusers(app: Any, client: httpx.AsyncClient) -> None:
    user = await create_user(app)
    tenant = await create_tenant(app, user)
    h = await bearer(user)
    for method, path in (
        ("GET", "/v1/admin/users"),
        ("GET", "/v1/admin/tenants"),
        ("POST", f"/v1/admin/tenants/{tenant.id}/suspend"),
        ("POST", f"/v1/admin/tenants/{tenant.id}/unsuspend"),
    ):
        r = await client.request(method, path, headers=h)
        assert r.status_code == 403, path
        assert (await client.request(method, path)).status_code == 401


async def test_search_users_and_tenants(app: Any, client: httpx.AsyncClient) -> None:
    admin = await bearer(await create_user(app, superuser=True))
    tag = uuid.uuid4().hex[:8]
    a = await create_user(app, email=f"findme-{tag}@example.com")
    await create_user(app, name=f"Name {tag}_x")
    await create_user(app, email=f"other-{uuid.uuid4().hex[:8]}@example.com")
    await create_tenant(app, a, name=f"Needle {tag}")
    await create_tenant(app, a, name="Haystack")

    r = await client.get(f"/v1/admin/users?q={tag.upper()}", headers=admin)
    assert r.status_code == 200 and r.json()["total"] == 2
    assert "hashed_password" not in r.json()["items"][0]
    r = await client.get("/v1/admin/users?q=%25", headers=admin)  # a literal %, not a wildcard
    assert r.json()["total"] == 0
    r = await client.get("/v1/admin/users?size=2", headers=admin)
    assert r.json()["total"] == 4 and len(r.json()["items"]) == 2
    r = await client.get(f"/v1/admin/users?q={'x' * 201}", headers=admin)
    assert r.status_code == 422

    r = await client.get(f"/v1/admin/tenants?q=needle {tag}", headers=admin)
    assert [t["name"] for t in r.json()["items"]] == [f"Needle {tag}"]
    r = await client.get("/v1/admin/tenants?status=suspended", headers=admin)
    assert r.json()["total"] == 0
    r = await client.get("/v1/admin/tenants?status=bogus", headers=admin)
    assert r.status_code == 422


async def test_suspend_and_unsuspend(app: Any, client: httpx.AsyncClient) -> None:
    root = await create_user(app, superuser=True)
    admin = await bearer(root)
    owner, member = await create_user(app), await create_user(app)
    tenant = await create_tenant(app, owner, name="Naughty")
    await add_member(app, tenant, member, Role.member)
    url = f"/v1/tenants/{tenant.id}"
    _, secret = await create_api_key(app, tenant, creator=owner)
    key = key_header(secret)
    assert (await client.get(url, headers=key)).status_code == 200  # status now cached

    r = await client.post(f"/v1/admin/tenants/{tenant.id}/suspend", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    for who in (owner, member):
        r = await client.get(url, headers=await bearer(who))
        assert r.status_code == 403 and "suspended" in r.json()["detail"]
    r = await client.get(url, headers=key)  # at once, not when the cached status expires
    assert r.status_code == 403 and "suspended" in r.json()["detail"]
    r = await client.get("/v1/admin/tenants?status=suspended", headers=admin)
    assert [t["name"] for t in r.json()["items"]] == ["Naughty"]

    r = await client.post(f"/v1/admin/tenants/{tenant.id}/unsuspend", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert (await client.get(url, headers=await bearer(member))).status_code == 200
    assert (await client.get(url, headers=key)).status_code == 200
    r = await client.get(f"{url}/audit-events", headers=await bearer(owner))
    actions = [e["action"] for e in r.json()["items"]]
    assert sorted(actions) == ["tenant.suspended", "tenant.unsuspended"]
    assert all(e["actor_user_id"] == str(root.id) for e in r.json()["items"])

    r = await client.post(f"/v1/admin/tenants/{uuid.uuid4()}/suspend", headers=admin)
    assert r.status_code == 404
    r = await client.post("/v1/admin/tenants/nope/suspend", headers=admin)
    assert r.status_code == 422
