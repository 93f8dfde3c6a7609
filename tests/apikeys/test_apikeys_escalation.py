"""API-key authorization holes, through HTTP against the real MariaDB and Redis.

- Rotating or revoking a key obeys the rule creation obeys: a key may only act on keys whose
  scopes it holds itself (rotation used to hand a `keys:manage` key a full-scope secret).
- A key does not outlive its creator's access: removing a member, a member leaving, and an
  account's deletion revoke the keys that person created, at once and audited.
- A key's own `rate_limit_per_minute` may lower the plan's per-key limit, never raise it.
- A key created while its creator is being removed does not survive the removal, and lowering
  a member's role revokes their keys with scopes the new role does not hold.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import delete, func, select, text

from atrium.models import ApiKey, AuditEvent, Membership, Role, Tenant
from tests.support.apikeys import ALL_SCOPES, create_api_key, key_header
from tests.support.factories import DEFAULT_PASSWORD, add_member, bearer, create_tenant, create_user
from tests.support.quota import set_plan, superuser_headers


def _keys_url(tenant_id: Any) -> str:
    return f"/v1/tenants/{tenant_id}/api-keys"


async def _owner_and_tenant(app: Any) -> tuple[Any, Tenant, dict[str, str]]:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    return owner, tenant, await bearer(owner)


async def _key_count(app: Any, tenant_id: uuid.UUID) -> int:
    async with app.state.sessionmaker() as s:
        n = await s.scalar(
            select(func.count()).select_from(ApiKey).where(ApiKey.tenant_id == tenant_id)
        )
    return int(n or 0)


async def _revocations(app: Any, tenant_id: uuid.UUID) -> list[AuditEvent]:
    async with app.state.sessionmaker() as s:
        rows = await s.execute(
            select(AuditEvent)
            .where(AuditEvent.tenant_id == tenant_id, AuditEvent.action == "api_key.revoked")
            .order_by(AuditEvent.created_at, AuditEvent.id)
        )
    return list(rows.scalars().all())


# --- Finding 1: rotation and revocation cannot escalate --------------------------------------


async def test_key_manager_cannot_rotate_a_key_with_more_scopes(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)
    _, manager = await create_api_key(app, tenant, ["keys:manage"])
    full, full_secret = await create_api_key(app, tenant, ALL_SCOPES)
    before = await _key_count(app, tenant.id)

    r = await client.post(
        f"{url}/{full.id}/rotate",
        json={"grace_period_seconds": 7 * 24 * 3600},
        headers=key_header(manager),
    )
    assert r.status_code == 403, r.text
    detail = r.json()["detail"]
    held = {"keys:manage"}
    assert detail["scopes_not_held"] == sorted(set(ALL_SCOPES) - held)
    assert "cannot rotate" in detail["message"]
    # Nothing was issued and the old key is untouched (no grace period started).
    assert await _key_count(app, tenant.id) == before
    async with app.state.sessionmaker() as s:
        row = await s.get(ApiKey, full.id)
        assert row is not None and row.revoked_at is None
    assert (await client.get(url, headers=key_header(full_secret))).status_code == 200

    # A key it could have created itself, it may rotate.
    peer, _ = await create_api_key(app, tenant, ["keys:manage"])
    r = await client.post(f"{url}/{peer.id}/rotate", headers=key_header(manager))
    assert r.status_code == 201, r.text
    assert r.json()["scopes"] == ["keys:manage"]


async def test_key_manager_cannot_revoke_a_key_with_more_scopes(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)
    _, manager = await create_api_key(app, tenant, ["keys:manage", "search"])
    full, full_secret = await create_api_key(app, tenant, ALL_SCOPES)

    r = await client.delete(f"{url}/{full.id}", headers=key_header(manager))
    assert r.status_code == 403, r.text
    detail = r.json()["detail"]
    assert "cannot revoke" in detail["message"]
    assert "documents:write" in detail["scopes_not_held"]
    assert "search" not in detail["scopes_not_held"]
    assert (await client.get(url, headers=key_header(full_secret))).status_code == 200

    # Within its own scopes it may revoke; a person with keys:manage may revoke any key.
    narrow, narrow_secret = await create_api_key(app, tenant, ["search"])
    assert (
        await client.delete(f"{url}/{narrow.id}", headers=key_header(manager))
    ).status_code == 204
    assert (await client.get(url, headers=key_header(narrow_secret))).status_code == 401
    assert (await client.delete(f"{url}/{full.id}", headers=admin)).status_code == 204
    assert (await client.get(url, headers=key_header(full_secret))).status_code == 401


# --- Finding 6: keys do not outlive their creator's access ------------------------------------


async def test_removed_member_keys_are_revoked_at_once(app: Any, client: httpx.AsyncClient) -> None:
    owner, tenant, owner_h = await _owner_and_tenant(app)
    leaver = await create_user(app)
    await add_member(app, tenant, leaver, Role.admin)
    url = _keys_url(tenant.id)

    r = await client.post(
        url,
        json={"name": "theirs", "scopes": ["keys:manage", "search"]},
        headers=await bearer(leaver),
    )
    assert r.status_code == 201, r.text
    theirs = r.json()
    # A key their key minted carries their id too.
    r = await client.post(
        url, json={"name": "child", "scopes": ["keys:manage"]}, headers=key_header(theirs["key"])
    )
    assert r.status_code == 201, r.text
    child = r.json()
    r = await client.post(url, json={"name": "owner's", "scopes": ["keys:manage"]}, headers=owner_h)
    kept = r.json()
    # Each is used once, so its record is cached in Redis: revocation must overwrite the cached
    # records, not wait for them to expire.
    for secret in (theirs["key"], child["key"], kept["key"]):
        assert (await client.get(url, headers=key_header(secret))).status_code == 200

    r = await client.delete(f"/v1/tenants/{tenant.id}/members/{leaver.id}", headers=owner_h)
    assert r.status_code == 204, r.text

    for secret in (theirs["key"], child["key"]):
        r = await client.get(url, headers=key_header(secret))
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # Other people's keys are untouched.
    assert (await client.get(url, headers=key_header(kept["key"]))).status_code == 200
    r = await client.get(url, params={"include_revoked": "true"}, headers=owner_h)
    listed = {k["id"]: k["status"] for k in r.json()["items"]}
    assert listed == {theirs["id"]: "revoked", child["id"]: "revoked", kept["id"]: "active"}

    events = await _revocations(app, tenant.id)
    assert {e.target_id for e in events} == {theirs["id"], child["id"]}
    assert all(e.actor_user_id == owner.id for e in events)
    assert all(e.data["reason"] == "member_removed" for e in events)
    assert all(e.data["created_by_user_id"] == str(leaver.id) for e in events)


async def test_member_who_leaves_loses_their_keys(app: Any, client: httpx.AsyncClient) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    leaver = await create_user(app)
    await add_member(app, tenant, leaver, Role.admin)
    leaver_h = await bearer(leaver)
    url = _keys_url(tenant.id)
    r = await client.post(url, json={"name": "mine", "scopes": ["keys:manage"]}, headers=leaver_h)
    mine = r.json()
    assert (await client.get(url, headers=key_header(mine["key"]))).status_code == 200

    r = await client.post(f"/v1/tenants/{tenant.id}/leave", headers=leaver_h)
    assert r.status_code == 204, r.text

    r = await client.get(url, headers=key_header(mine["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    events = await _revocations(app, tenant.id)
    assert [(e.target_id, e.data["reason"], e.actor_user_id) for e in events] == [
        (mine["id"], "member_left", leaver.id)
    ]


async def test_deleted_account_keys_are_revoked_in_every_tenant(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, owner_h = await _owner_and_tenant(app)
    leaver = await create_user(app)
    await add_member(app, tenant, leaver, Role.admin)
    leaver_h = await bearer(leaver)
    url = _keys_url(tenant.id)
    r = await client.post(url, json={"name": "mine", "scopes": ["keys:manage"]}, headers=leaver_h)
    mine = r.json()
    # A rotating key (grace period running) is cut off too.
    r = await client.post(
        url, json={"name": "rotating", "scopes": ["keys:manage"]}, headers=leaver_h
    )
    rotating = r.json()
    r = await client.post(
        f"{url}/{rotating['id']}/rotate", json={"grace_period_seconds": 3600}, headers=leaver_h
    )
    assert r.status_code == 201, r.text
    replacement = r.json()
    for secret in (mine["key"], rotating["key"], replacement["key"]):
        assert (await client.get(url, headers=key_header(secret))).status_code == 200

    r = await client.request(
        "DELETE", "/v1/users/me", json={"password": DEFAULT_PASSWORD}, headers=leaver_h
    )
    assert r.status_code == 202, r.text

    for secret in (mine["key"], rotating["key"], replacement["key"]):
        r = await client.get(url, headers=key_header(secret))
        assert r.status_code == 401 and "revoked" in r.json()["detail"]
    r = await client.get(url, params={"include_revoked": "true"}, headers=owner_h)
    assert {k["status"] for k in r.json()["items"]} == {"revoked"}
    events = await _revocations(app, tenant.id)
    assert {e.target_id for e in events} == {mine["id"], rotating["id"], replacement["id"]}
    assert all(e.data["reason"] == "account_deleted" for e in events)


# --- Review M3: key creation against a concurrent removal; a lowered role -------------------


async def _waits_for_the_membership_lock(app: Any, done: asyncio.Task[Any]) -> bool:
    """Whether another connection of this test's database is in a locking read of
    ``memberships`` (polled until one is, or ``done`` finished without one). While the test
    holds the row's lock, such a read can only be waiting for it. (MariaDB lists the statement
    in the process list at once; INNODB_TRX may not show the transaction as waiting yet.)"""
    deadline = asyncio.get_running_loop().time() + 30
    async with app.state.sessionmaker() as s:
        while not done.done() and asyncio.get_running_loop().time() < deadline:
            waiting = await s.scalar(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                    "WHERE DB = DATABASE() AND ID <> CONNECTION_ID() AND COMMAND = 'Query' "
                    "AND INFO LIKE '%FROM memberships%' "
                    "AND (INFO LIKE '%LOCK IN SHARE MODE%' OR INFO LIKE '%FOR SHARE%')"
                )
            )
            await s.rollback()
            if waiting:
                return True
            await asyncio.sleep(0.05)
    return False


async def test_key_created_while_its_creator_is_removed_is_refused(
    app: Any, client: httpx.AsyncClient
) -> None:
    # The creation was authorized (the membership was there) but the removal commits before
    # the creation does: the key must not land, live, after the removal revoked the rest.
    _, tenant, owner_h = await _owner_and_tenant(app)
    leaver = await create_user(app)
    await add_member(app, tenant, leaver, Role.admin)
    leaver_h = await bearer(leaver)
    url = _keys_url(tenant.id)
    row = (Membership.tenant_id == tenant.id, Membership.user_id == leaver.id)
    async with app.state.sessionmaker() as removal:
        # What DELETE .../members/{id} does first: lock the membership row for update.
        await removal.execute(select(Membership).where(*row).with_for_update())
        create = asyncio.create_task(
            client.post(url, json={"name": "late", "scopes": ["search"]}, headers=leaver_h)
        )
        waited = await _waits_for_the_membership_lock(app, create)
        await removal.execute(delete(Membership).where(*row))
        await removal.commit()
    r = await create
    assert r.status_code == 404, r.text
    assert waited
    assert await _key_count(app, tenant.id) == 0
    # The owner's own creation is unaffected.
    r = await client.post(url, json={"name": "owner's", "scopes": ["search"]}, headers=owner_h)
    assert r.status_code == 201, r.text


async def test_key_minted_by_a_key_while_its_creator_is_removed_is_refused(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, owner_h = await _owner_and_tenant(app)
    leaver = await create_user(app)
    await add_member(app, tenant, leaver, Role.admin)
    url = _keys_url(tenant.id)
    r = await client.post(
        url, json={"name": "theirs", "scopes": ["keys:manage"]}, headers=await bearer(leaver)
    )
    theirs = r.json()
    row = (Membership.tenant_id == tenant.id, Membership.user_id == leaver.id)
    async with app.state.sessionmaker() as removal:
        await removal.execute(select(Membership).where(*row).with_for_update())
        create = asyncio.create_task(
            client.post(
                url,
                json={"name": "child", "scopes": ["keys:manage"]},
                headers=key_header(theirs["key"]),
            )
        )
        waited = await _waits_for_the_membership_lock(app, create)
        await removal.execute(delete(Membership).where(*row))
        await removal.commit()
    r = await create
    assert r.status_code == 401 and "revoked" in r.json()["detail"], r.text
    assert waited
    r = await client.get(url, params={"include_revoked": "true"}, headers=owner_h)
    assert [k["id"] for k in r.json()["items"]] == [theirs["id"]]


async def test_lowering_a_role_revokes_the_keys_it_no_longer_covers(
    app: Any, client: httpx.AsyncClient
) -> None:
    owner, tenant, owner_h = await _owner_and_tenant(app)
    person = await create_user(app)
    await add_member(app, tenant, person, Role.admin)
    person_h = await bearer(person)
    url = _keys_url(tenant.id)
    made: dict[str, Any] = {}
    for name, scopes in {
        "manager": ["keys:manage", "usage:read"],
        "writer": ["documents:write", "usage:read"],
        "reader": ["usage:read"],
    }.items():
        r = await client.post(url, json={"name": name, "scopes": scopes}, headers=person_h)
        assert r.status_code == 201, r.text
        made[name] = r.json()
    # A key the manager key minted carries the person's id too.
    r = await client.post(
        url,
        json={"name": "child", "scopes": ["keys:manage"]},
        headers=key_header(made["manager"]["key"]),
    )
    assert r.status_code == 201, r.text
    made["child"] = r.json()
    r = await client.post(url, json={"name": "owner's", "scopes": ["keys:manage"]}, headers=owner_h)
    made["owner's"] = r.json()
    usage = f"/v1/tenants/{tenant.id}/usage"

    async def works(name: str) -> bool:
        k = made[name]
        r = await client.get(
            url if "keys:manage" in k["scopes"] else usage, headers=key_header(k["key"])
        )
        assert r.status_code == 200 or "revoked" in r.json()["detail"], r.text
        return r.status_code == 200

    # Each is used once, so its record is cached in Redis: the change must overwrite it.
    assert all([await works(n) for n in made])
    member_url = f"/v1/tenants/{tenant.id}/members/{person.id}"
    r = await client.patch(member_url, json={"role": "member"}, headers=owner_h)
    assert r.status_code == 200, r.text
    # A member cannot manage keys: the keys that can are gone; the rest are within the role.
    assert {n: await works(n) for n in made} == {
        "manager": False,
        "child": False,
        "writer": True,
        "reader": True,
        "owner's": True,
    }
    r = await client.patch(member_url, json={"role": "viewer"}, headers=owner_h)
    assert r.status_code == 200, r.text
    assert {n: await works(n) for n in ("writer", "reader")} == {"writer": False, "reader": True}
    # Raising the role again revokes nothing (and restores nothing).
    r = await client.patch(member_url, json={"role": "admin"}, headers=owner_h)
    assert r.status_code == 200, r.text
    assert await works("reader") and not await works("manager")

    events = await _revocations(app, tenant.id)
    assert len(events) == 3
    assert {e.target_id for e in events} == {
        made["manager"]["id"],
        made["child"]["id"],
        made["writer"]["id"],
    }
    assert all(e.data["reason"] == "role_lowered" for e in events)
    assert all(e.actor_user_id == owner.id for e in events)
    assert all(e.data["created_by_user_id"] == str(person.id) for e in events)


# --- Finding 12: a key's rate limit never exceeds the plan's ----------------------------------


async def test_key_rate_limit_above_the_plan_is_refused(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)  # the free plan: 60 per minute per key
    url = _keys_url(tenant.id)
    r = await client.post(
        url,
        json={"name": "greedy", "scopes": ["search"], "rate_limit_per_minute": 61},
        headers=admin,
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["detail"]["plan_limit"] == 60 and body["detail"]["field"] == "rate_limit_per_minute"
    assert await _key_count(app, tenant.id) == 0

    r = await client.post(
        url, json={"name": "fair", "scopes": ["search"], "rate_limit_per_minute": 60}, headers=admin
    )
    assert r.status_code == 201, r.text
    assert r.json()["rate_limit_per_minute"] == 60


async def test_key_rate_limit_is_capped_by_a_lowered_plan(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, owner_h = await _owner_and_tenant(app)
    superuser = await superuser_headers(app)
    await set_plan(client, superuser, tenant.id, "pro")  # 600 per minute per key
    r = await client.post(
        _keys_url(tenant.id),
        json={"name": "fast", "scopes": ["usage:read"], "rate_limit_per_minute": 500},
        headers=owner_h,
    )
    assert r.status_code == 201, r.text
    fast = key_header(r.json()["key"])

    # Downgraded later: the key's 500 is now above the plan's limit, which wins.
    await set_plan(client, superuser, tenant.id, "pro", {"requests_per_minute_per_key": 3})
    usage = f"/v1/tenants/{tenant.id}/usage"
    statuses = []
    for _ in range(4):
        r = await client.get(usage, headers=fast)
        statuses.append(r.status_code)
        assert r.headers["X-RateLimit-Limit"] == "3"
    assert statuses == [200, 200, 200, 429]
