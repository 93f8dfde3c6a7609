"""Tenants, members, roles, ownership, the audit log and the purge, through HTTP."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from atrium.models import Role, Tenant, TenantStatus, User
from tests.support.accounts import eventually, partition_exists, tenant_row_count
from tests.support.factories import add_member, bearer, create_tenant, create_user


async def _team(app: Any) -> dict[str, Any]:
    """A tenant with an owner, an admin, a member and a viewer."""
    people = {role: await create_user(app, name=role.value.title()) for role in Role}
    tenant = await create_tenant(app, people[Role.owner], name="Team")
    for role in (Role.admin, Role.member, Role.viewer):
        await add_member(app, tenant, people[role], role)
    headers = {role: await bearer(u) for role, u in people.items()}
    return {"tenant": tenant, "people": people, "h": headers, "url": f"/v1/tenants/{tenant.id}"}


# Tenants -----------------------------------------------------------------------------------


async def test_create_list_get_and_rename(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    user = await create_user(app)
    h = await bearer(user)
    r = await client.post("/v1/tenants", json={"name": "  Acme  "}, headers=h)
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == "Acme" and t["role"] == "owner" and t["status"] == "active"
    # The vector partition waits for the first upload (see test_partition_is_created_lazily).
    assert not await partition_exists(settings, t["id"])
    for bad in ({"name": ""}, {"name": "   "}, {"name": "x" * 201}, {}):
        assert (await client.post("/v1/tenants", json=bad, headers=h)).status_code == 422
    assert (await client.post("/v1/tenants", json={"name": "A"})).status_code == 401

    await client.post("/v1/tenants", json={"name": "Second"}, headers=h)
    pages = [(await client.get(f"/v1/tenants?size=1&page={p}", headers=h)).json() for p in (1, 2)]
    assert [p["total"] for p in pages] == [2, 2]
    assert sorted(i["name"] for p in pages for i in p["items"]) == ["Acme", "Second"]

    r = await client.get(f"/v1/tenants/{t['id']}", headers=h)
    assert r.status_code == 200 and r.json()["plan"] == "free"
    r = await client.patch(f"/v1/tenants/{t['id']}", json={"name": "Acme Ltd"}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "Acme Ltd"
    r = await client.patch(f"/v1/tenants/{t['id']}", json={"name": ""}, headers=h)
    assert r.status_code == 422
    r = await client.get(f"/v1/tenants/{uuid.uuid4()}", headers=h)
    assert r.status_code == 404
    r = await client.get("/v1/tenants/not-a-uuid", headers=h)
    assert r.status_code == 422


async def test_roles_decide_who_may_do_what(app: Any, client: httpx.AsyncClient) -> None:
    team = await _team(app)
    url, h = team["url"], team["h"]
    r = await client.patch(url, json={"name": "X"}, headers=h[Role.member])
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "tenant:update"
    assert (await client.patch(url, json={"name": "X"}, headers=h[Role.admin])).status_code == 200
    r = await client.delete(url, headers=h[Role.admin])
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "tenant:delete"
    assert (await client.get(f"{url}/members", headers=h[Role.viewer])).status_code == 200
    r = await client.get(f"{url}/audit-events", headers=h[Role.member])
    assert r.status_code == 403
    stranger = await bearer(await create_user(app))
    assert (await client.get(url, headers=stranger)).status_code == 404


async def test_delete_tenant_purges_rows_and_partition(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    owner = await create_user(app)
    h = await bearer(owner)
    r = await client.post("/v1/tenants", json={"name": "Doomed"}, headers=h)
    tid = r.json()["id"]
    await add_member(app, await _get_tenant(app, tid), await create_user(app), Role.member)
    await app.state.redis.set(f"atrium:t:{tid}:k", "v")
    r = await client.delete(f"/v1/tenants/{tid}", headers=h)
    assert r.status_code == 202
    # Hidden at once.
    assert (await client.get(f"/v1/tenants/{tid}", headers=h)).status_code == 404
    assert (await client.get("/v1/tenants", headers=h)).json()["total"] == 0

    async def gone() -> bool:
        return await tenant_row_count(app, tid) == 0

    await eventually(gone, what="tenant purge")
    assert not await partition_exists(settings, tid)
    assert await app.state.redis.get(f"atrium:t:{tid}:k") is None


async def test_purge_is_idempotent_and_needs_a_tenant_id(app: Any, celery_worker: Any) -> None:
    import asyncio

    from atrium.worker import celery_app

    res = celery_app.send_task("atrium.tenants.purge", kwargs={"tenant_id": str(uuid.uuid4())})
    out = await asyncio.to_thread(res.get, timeout=60)
    assert out["tenant_row"] == 0 and out["partition_dropped"] is False
    res = celery_app.send_task("atrium.tenants.purge", kwargs={})
    with pytest.raises(TypeError):
        await asyncio.to_thread(res.get, timeout=60)


async def _get_tenant(app: Any, tid: str) -> Tenant:
    async with app.state.sessionmaker() as s:
        t = await s.get(Tenant, uuid.UUID(tid))
        assert t is not None
        return t


# Members -----------------------------------------------------------------------------------


async def test_member_list_and_role_changes(app: Any, client: httpx.AsyncClient) -> None:
    team = await _team(app)
    url, h, people = team["url"], team["h"], team["people"]
    r = await client.get(f"{url}/members", headers=h[Role.viewer])
    assert [m["role"] for m in r.json()["items"]] == ["owner", "admin", "member", "viewer"]
    assert r.json()["total"] == 4

    member = people[Role.member].id
    r = await client.patch(
        f"{url}/members/{member}", json={"role": "viewer"}, headers=h[Role.admin]
    )
    assert r.status_code == 200 and r.json()["role"] == "viewer"
    r = await client.patch(f"{url}/members/{member}", json={"role": "owner"}, headers=h[Role.owner])
    assert r.status_code == 422  # ownership moves through transfer-ownership
    r = await client.patch(f"{url}/members/{member}", json={"role": "boss"}, headers=h[Role.owner])
    assert r.status_code == 422
    r = await client.patch(f"{url}/members/{member}", json={}, headers=h[Role.owner])
    assert r.status_code == 422
    r = await client.patch(
        f"{url}/members/{uuid.uuid4()}", json={"role": "viewer"}, headers=h[Role.owner]
    )
    assert r.status_code == 404
    r = await client.patch(
        f"{url}/members/{member}", json={"role": "admin"}, headers=h[Role.member]
    )
    assert r.status_code == 403

    owner = people[Role.owner].id
    r = await client.patch(f"{url}/members/{owner}", json={"role": "admin"}, headers=h[Role.admin])
    assert r.status_code == 403 and "owner" in r.json()["detail"]
    r = await client.patch(f"{url}/members/{owner}", json={"role": "admin"}, headers=h[Role.owner])
    assert r.status_code == 409 and "no owner" in r.json()["detail"]


async def test_remove_member_and_leave(app: Any, client: httpx.AsyncClient) -> None:
    team = await _team(app)
    url, h, people = team["url"], team["h"], team["people"]
    viewer = people[Role.viewer].id
    r = await client.delete(f"{url}/members/{viewer}", headers=h[Role.admin])
    assert r.status_code == 204
    assert (await client.get(url, headers=h[Role.viewer])).status_code == 404  # access gone
    assert (
        await client.delete(f"{url}/members/{viewer}", headers=h[Role.admin])
    ).status_code == 404
    owner = people[Role.owner].id
    assert (await client.delete(f"{url}/members/{owner}", headers=h[Role.admin])).status_code == 403
    r = await client.delete(f"{url}/members/{owner}", headers=h[Role.owner])
    assert r.status_code == 409

    r = await client.post(f"{url}/leave", headers=h[Role.owner])
    assert r.status_code == 409 and "only owner" in r.json()["detail"]
    assert (await client.post(f"{url}/leave", headers=h[Role.member])).status_code == 204
    assert (await client.get(url, headers=h[Role.member])).status_code == 404


async def test_transfer_ownership(app: Any, client: httpx.AsyncClient) -> None:
    team = await _team(app)
    url, h, people = team["url"], team["h"], team["people"]
    owner, member = people[Role.owner].id, people[Role.member].id
    r = await client.post(
        f"{url}/transfer-ownership", json={"user_id": str(member)}, headers=h[Role.admin]
    )
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "ownership:transfer"
    r = await client.post(
        f"{url}/transfer-ownership", json={"user_id": str(owner)}, headers=h[Role.owner]
    )
    assert r.status_code == 422
    r = await client.post(
        f"{url}/transfer-ownership", json={"user_id": str(uuid.uuid4())}, headers=h[Role.owner]
    )
    assert r.status_code == 404
    r = await client.post(f"{url}/transfer-ownership", json={"user_id": "x"}, headers=h[Role.owner])
    assert r.status_code == 422
    r = await client.post(
        f"{url}/transfer-ownership", json={"user_id": str(member)}, headers=h[Role.owner]
    )
    assert r.status_code == 200
    assert {m["user_id"]: m["role"] for m in r.json()} == {
        str(member): "owner",
        str(owner): "admin",
    }
    # The former owner can no longer delete; the new one can.
    assert (await client.delete(url, headers=h[Role.owner])).status_code == 403
    r = await client.post(f"{url}/leave", headers=h[Role.owner])
    assert r.status_code == 204


# Audit log and suspension ------------------------------------------------------------------


async def test_audit_events_are_paginated_and_scoped(app: Any, client: httpx.AsyncClient) -> None:
    team = await _team(app)
    url, h, people = team["url"], team["h"], team["people"]
    for role in ("viewer", "member", "admin"):
        r = await client.patch(
            f"{url}/members/{people[Role.member].id}",
            json={"role": role},
            headers=h[Role.owner],
        )
        assert r.status_code == 200
    other = await create_tenant(app, people[Role.owner])
    await client.patch(f"/v1/tenants/{other.id}", json={"name": "Elsewhere"}, headers=h[Role.owner])

    r = await client.get(f"{url}/audit-events?size=2", headers=h[Role.admin])
    assert r.status_code == 200
    page = r.json()
    assert page["total"] == 3 and len(page["items"]) == 2
    first = page["items"][0]
    assert first["action"] == "member.role_changed"
    assert first["actor_user_id"] == str(people[Role.owner].id)
    assert first["ip"] == "127.0.0.1" and first["tenant_id"] == str(team["tenant"].id)
    assert {"created_at", "user_agent", "target_id", "data"} <= set(first)
    rest = (await client.get(f"{url}/audit-events?size=2&page=2", headers=h[Role.admin])).json()
    # MariaDB keeps whole seconds, so events of one second may come in any order among them.
    seen = [e["data"]["to"] for e in page["items"] + rest["items"]]
    assert sorted(seen) == ["admin", "member", "viewer"]
    r = await client.get(f"{url}/audit-events?page=0", headers=h[Role.admin])
    assert r.status_code == 422


async def test_suspended_tenant_refuses_members_with_a_reason(
    app: Any, client: httpx.AsyncClient
) -> None:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner, status=TenantStatus.suspended)
    r = await client.get(f"/v1/tenants/{tenant.id}/members", headers=await bearer(owner))
    assert r.status_code == 403 and "suspended" in r.json()["detail"]


async def test_user_model_columns_are_exposed_safely(app: Any, client: httpx.AsyncClient) -> None:
    user: User = await create_user(app, name="Zed")
    tenant = await create_tenant(app, user)
    r = await client.get(f"/v1/tenants/{tenant.id}/members", headers=await bearer(user))
    member = r.json()["items"][0]
    assert set(member) == {"user_id", "email", "name", "role", "joined_at"}


async def test_every_foreign_key_to_tenants_and_users_lets_the_row_go(app: Any) -> None:
    """The purge and account deletion rely on the database: every FK to ``tenants`` must cascade
    and every FK to ``users`` must cascade or set null, in the migrated MariaDB schema."""
    from sqlalchemy import text

    async with app.state.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT TABLE_NAME, REFERENCED_TABLE_NAME, DELETE_RULE "
                    "FROM information_schema.REFERENTIAL_CONSTRAINTS "
                    "WHERE CONSTRAINT_SCHEMA = DATABASE() "
                    "AND REFERENCED_TABLE_NAME IN ('tenants', 'users')"
                )
            )
        ).all()
    assert rows
    bad = [
        (table, ref, rule)
        for table, ref, rule in rows
        if not (rule == "CASCADE" or (ref == "users" and rule == "SET NULL"))
    ]
    assert not bad, f"foreign keys that would block a purge or an account deletion: {bad}"


async def test_an_api_key_cannot_leave(app: Any, client: httpx.AsyncClient) -> None:
    from tests.support.apikeys import create_api_key, key_header

    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    _, secret = await create_api_key(app, tenant, creator=owner)
    r = await client.post(f"/v1/tenants/{tenant.id}/leave", headers=key_header(secret))
    assert r.status_code == 400 and "revoke" in r.json()["detail"]


# Limits on tenant creation ---------------------------------------------------------------


async def test_owned_tenants_are_capped_and_creation_is_rate_limited(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    cap = settings.max_tenants_per_user
    owner = await create_user(app)
    h = await bearer(owner)
    # Tenants the user merely belongs to do not count.
    await add_member(app, await create_tenant(app, await create_user(app)), owner, Role.admin)
    created = []
    for i in range(cap):
        r = await client.post("/v1/tenants", json={"name": f"Mine {i}"}, headers=h)
        assert r.status_code == 201, r.text
        created.append(r.json()["id"])
    r = await client.post("/v1/tenants", json={"name": "One too many"}, headers=h)
    assert r.status_code == 409, r.text
    assert r.json()["detail"]["limit"] == cap and r.json()["detail"]["owned"] == cap
    assert "delete one" in r.json()["detail"]["message"]
    assert (await client.get("/v1/tenants", headers=h)).json()["total"] == cap + 1

    # A tenant being deleted frees its slot...
    assert (await client.delete(f"/v1/tenants/{created[0]}", headers=h)).status_code == 202
    r = await client.post("/v1/tenants", json={"name": "Replacement"}, headers=h)
    assert r.status_code == 201, r.text
    # ...but creating (or trying to) is limited per user: 10 an hour, refused ones included.
    attempts = cap + 2
    while attempts < 10:
        r = await client.post("/v1/tenants", json={"name": "Again"}, headers=h)
        assert r.status_code == 409, r.text
        attempts += 1
    r = await client.post("/v1/tenants", json={"name": "Again"}, headers=h)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert r.headers["X-RateLimit-Limit"] == "10"
    # Another user is not affected.
    other = await bearer(await create_user(app))
    assert (await client.post("/v1/tenants", json={"name": "Theirs"}, headers=other)).is_success


async def test_the_cap_holds_when_creations_race(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    cap = settings.max_tenants_per_user
    h = await bearer(await create_user(app))
    responses = await asyncio.gather(
        *(client.post("/v1/tenants", json={"name": f"Race {i}"}, headers=h) for i in range(8))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * cap + [409] * (8 - cap), [r.text for r in responses]
    assert (await client.get("/v1/tenants", headers=h)).json()["total"] == cap


async def test_transfer_cannot_push_the_new_owner_past_the_cap(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    # The bypass: create tenants up to the cap, hand each to another account (staying admin),
    # create more. The new owner's cap is what stops it.
    cap = settings.max_tenants_per_user
    maker, keeper = await create_user(app), await create_user(app)
    mh, kh = await bearer(maker), await bearer(keeper)

    async def made_and_handed_over(name: str) -> tuple[str, httpx.Response]:
        r = await client.post("/v1/tenants", json={"name": name}, headers=mh)
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        async with app.state.sessionmaker() as s:
            tenant = await s.get(Tenant, uuid.UUID(tid))
        assert tenant is not None
        await add_member(app, tenant, keeper, Role.member)
        r = await client.post(
            f"/v1/tenants/{tid}/transfer-ownership", json={"user_id": str(keeper.id)}, headers=mh
        )
        return tid, r

    for i in range(cap):
        _, r = await made_and_handed_over(f"Handed {i}")
        assert r.status_code == 200, r.text
    # The maker owns none now and may create again, but the keeper is at the cap: refused,
    # and nothing changed.
    tid, r = await made_and_handed_over("One too many")
    assert r.status_code == 409, r.text
    operation = app.openapi()["paths"]["/v1/tenants/{tenant_id}/transfer-ownership"]["post"]
    assert "409" in operation["responses"]  # declared, as every status a route returns
    detail = r.json()["detail"]
    assert detail["owned"] == cap and detail["limit"] == cap
    assert "delete or hand over one" in detail["message"]
    r = await client.get(f"/v1/tenants/{tid}/members", headers=mh)
    assert {m["user_id"]: m["role"] for m in r.json()["items"]} == {
        str(maker.id): "owner",
        str(keeper.id): "member",
    }
    kept = (await client.get("/v1/tenants?size=100", headers=kh)).json()["items"]
    assert sum(t["role"] == "owner" for t in kept) == cap

    # One being deleted frees a slot, as it does for creation.
    first = next(t["id"] for t in kept if t["role"] == "owner")
    assert (await client.delete(f"/v1/tenants/{first}", headers=kh)).status_code == 202
    r = await client.post(
        f"/v1/tenants/{tid}/transfer-ownership", json={"user_id": str(keeper.id)}, headers=mh
    )
    assert r.status_code == 200, r.text


async def test_partition_is_created_lazily_by_the_first_upload(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, settings: Any
) -> None:
    from tests.support.retrieval import create_collection, make_tenant, upload, wait_ready

    world = await make_tenant(app, client)
    assert not await partition_exists(settings, world.tenant_id)
    # Searching a tenant without a partition answers an empty result, not an error.
    await create_collection(client, world, "docs")
    for mode in ("vector", "hybrid"):
        r = await client.post(
            world.url("search"), json={"query": "tower", "mode": mode}, headers=world.headers
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"] == []
    # Two first uploads at once: the worker creates the partition once, both land in it.
    docs = [
        await upload(client, world, "docs", "Eiffel", "The Eiffel Tower is in Paris.", {}),
        await upload(client, world, "docs", "Ocean", "The Pacific is the deepest ocean.", {}),
    ]
    for doc in docs:
        await wait_ready(client, world, "docs", doc)
    assert await partition_exists(settings, world.tenant_id)
    r = await client.post(
        world.url("search"), json={"query": "tower in Paris", "top_k": 1}, headers=world.headers
    )
    assert r.status_code == 200, r.text
    assert [x["title"] for x in r.json()["results"]] == ["Eiffel"]


async def test_partition_creation_is_safe_when_workers_race(app: Any, settings: Any) -> None:
    import psycopg

    from atrium.kit.vectordb import drop_tenant_partition, ensure_tenant_partition

    tenant_id = uuid.uuid4()

    async def create() -> str:
        async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
            return await ensure_tenant_partition(conn, tenant_id)

    try:
        names = await asyncio.gather(*(create() for _ in range(8)))
        assert len(set(names)) == 1
        assert await partition_exists(settings, tenant_id)
    finally:
        async with app.state.vector_pool.connection() as conn:
            await drop_tenant_partition(conn, tenant_id)
