"""API keys end to end through HTTP, against the real MariaDB and Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from atrium.apikeys import cache, service
from atrium.apikeys import secrets as keyfmt
from atrium.auth import api_keys as authentication
from atrium.auth.permissions import Permission
from atrium.kit.errors import Unauthorized
from atrium.models import ApiKey, AuditEvent, Role, Tenant, TenantStatus, utcnow
from atrium.tenants.status import forget_status
from tests.support.apikeys import ALL_SCOPES, create_api_key, key_header
from tests.support.factories import add_member, bearer, create_tenant, create_user
from tests.support.sql import sql_log


def _keys_url(tenant_id: Any) -> str:
    return f"/v1/tenants/{tenant_id}/api-keys"


class KeyClock:
    """API-key authentication's wall clock, which the test moves forward.

    Authentication compares ``time.time()`` with the expiry and revocation times of the key
    record it reads (from Redis or the database); moving this clock is how a test lets a grace
    period or a lifetime run out without waiting for it, while the cached record stays as it
    was written.
    """

    def __init__(self) -> None:
        self.ahead = 0.0

    def time(self) -> float:
        return time.time() + self.ahead

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


@pytest.fixture
def key_clock(monkeypatch: pytest.MonkeyPatch) -> KeyClock:
    clock = KeyClock()
    # Authentication reads the clock only through its module's ``time`` (time() and monotonic()).
    monkeypatch.setattr(authentication, "time", clock)
    return clock


async def _owner_and_tenant(app: Any) -> tuple[Any, Tenant, dict[str, str]]:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    return owner, tenant, await bearer(owner)


# --- Format ----------------------------------------------------------------------------------


def test_key_format_and_checksum() -> None:
    key = keyfmt.generate_key()
    assert key.startswith("atr_") and len(key) == keyfmt.KEY_LENGTH == 53
    assert keyfmt.is_well_formed(key)
    assert len({keyfmt.generate_key() for _ in range(1000)}) == 1000
    # One changed character anywhere (body or checksum) is caught by the checksum.
    for i in range(4, len(key)):
        changed = key[:i] + ("A" if key[i] != "A" else "B") + key[i + 1 :]
        assert not keyfmt.is_well_formed(changed), i
    assert not keyfmt.is_well_formed(key[:-1])
    assert not keyfmt.is_well_formed("atr_" + "!" * 49)
    assert not keyfmt.is_well_formed("xyz_" + key[4:])
    d1 = keyfmt.key_digest("secret-one", key)
    assert len(d1) == 64 and d1 != keyfmt.key_digest("secret-two", key)


async def test_malformed_key_is_refused_without_any_lookup() -> None:
    # No request, no session: reaching Redis or the database would raise AttributeError.
    good = keyfmt.generate_key()
    for bad in ("atr_", "atr_short", good[:-1] + ("x" if good[-1] != "x" else "y")):
        with pytest.raises(Unauthorized, match="Malformed API key"):
            await authentication.authenticate_api_key(None, None, bad, uuid.uuid4())  # type: ignore[arg-type]


async def test_malformed_key_over_http_runs_no_sql(app: Any, client: httpx.AsyncClient) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    with sql_log(app) as statements:
        r = await client.get(_keys_url(tenant.id), headers=key_header("atr_not-a-real-key"))
    assert r.status_code == 401
    assert "Malformed" in r.json()["detail"]
    assert statements == []


# --- Lifecycle -------------------------------------------------------------------------------


async def test_create_call_rotate_revoke_end_to_end(app: Any, client: httpx.AsyncClient) -> None:
    owner, tenant, admin = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)

    r = await client.post(
        url, json={"name": "ci", "scopes": ["keys:manage", "search"]}, headers=admin
    )
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["key"]
    assert keyfmt.is_well_formed(secret)
    assert created["prefix"] == secret[:12] and created["last_four"] == secret[-4:]
    assert created["scopes"] == ["search", "keys:manage"]
    assert created["status"] == "active"
    assert created["created_by_user_id"] == str(owner.id)

    # Only the HMAC is stored, never the key.
    async with app.state.sessionmaker() as s:
        row = await s.get(ApiKey, uuid.UUID(created["id"]))
        assert row is not None
        assert secret not in (row.key_hash, row.prefix) and len(row.key_hash) == 64
        assert row.key_hash == keyfmt.key_digest(
            app.state.settings.secret_key.get_secret_value(), secret
        )

    # The key works on its tenant's routes, twice (second time from the Redis cache).
    for _ in range(2):
        r = await client.get(url, headers=key_header(secret))
        assert r.status_code == 200, r.text
    listed = r.json()
    assert listed["total"] == 1
    assert "key" not in listed["items"][0] and "key_hash" not in listed["items"][0]

    # Rotate: new secret works, old one refused on the very next request.
    r = await client.post(f"{url}/{created['id']}/rotate", headers=key_header(secret))
    assert r.status_code == 201, r.text
    rotated = r.json()
    new_secret = rotated["key"]
    assert new_secret != secret and rotated["id"] != created["id"]
    assert rotated["rotated_from_id"] == created["id"]
    assert rotated["scopes"] == created["scopes"] and rotated["name"] == "ci"
    r = await client.get(url, headers=key_header(secret))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert (await client.get(url, headers=key_header(new_secret))).status_code == 200

    # Revoke the new one: refused on the next request (it was cached a moment ago).
    r = await client.delete(f"{url}/{rotated['id']}", headers=admin)
    assert r.status_code == 204
    r = await client.get(url, headers=key_header(new_secret))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # Idempotent.
    assert (await client.delete(f"{url}/{rotated['id']}", headers=admin)).status_code == 204

    # Listing hides revoked keys unless asked.
    r = await client.get(url, headers=admin)
    assert r.json()["total"] == 0
    r = await client.get(url, params={"include_revoked": "true"}, headers=admin)
    assert {k["status"] for k in r.json()["items"]} == {"revoked"}
    assert r.json()["total"] == 2

    # Every change was audited, by the right actor.
    async with app.state.sessionmaker() as s:
        events = (
            (
                await s.execute(
                    select(AuditEvent)
                    .where(AuditEvent.tenant_id == tenant.id)
                    .order_by(AuditEvent.created_at)
                )
            )
            .scalars()
            .all()
        )
    actions = [(e.action, e.target_id) for e in events]
    assert actions == [
        ("api_key.created", created["id"]),
        ("api_key.rotated", created["id"]),
        ("api_key.revoked", rotated["id"]),
    ]
    assert events[0].actor_user_id == owner.id
    assert events[1].actor_api_key_id == uuid.UUID(created["id"])
    assert events[1].data["new_key_id"] == rotated["id"]
    assert all(secret not in str(e.data) and new_secret not in str(e.data) for e in events)


async def test_rotation_grace_period(
    app: Any, client: httpx.AsyncClient, key_clock: KeyClock
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)
    r = await client.post(url, json={"name": "deploy", "scopes": ["keys:manage"]}, headers=admin)
    old = r.json()
    assert (await client.get(url, headers=key_header(old["key"]))).status_code == 200

    r = await client.post(
        f"{url}/{old['id']}/rotate", json={"grace_period_seconds": 60}, headers=admin
    )
    assert r.status_code == 201, r.text
    new = r.json()
    # Both work during the grace period; the old one is listed as rotating.
    assert (await client.get(url, headers=key_header(old["key"]))).status_code == 200
    r = await client.get(url, headers=key_header(new["key"]))
    statuses = {k["id"]: k["status"] for k in r.json()["items"]}
    assert statuses == {old["id"]: "rotating", new["id"]: "active"}
    # A rotating key cannot be rotated again.
    r = await client.post(f"{url}/{old['id']}/rotate", headers=admin)
    assert r.status_code == 409 and "already rotated" in r.json()["detail"]

    # Half-way through the grace period the old key still works; once it is over, the same
    # cached record refuses it (the clock moves, nothing rewrites the record).
    key_clock.ahead = 30
    assert (await client.get(url, headers=key_header(old["key"]))).status_code == 200
    key_clock.ahead = 61
    r = await client.get(url, headers=key_header(old["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert (await client.get(url, headers=key_header(new["key"]))).status_code == 200
    key_clock.ahead = 0

    # Revoking during a grace period ends it at once.
    r = await client.post(
        f"{url}/{new['id']}/rotate", json={"grace_period_seconds": 3600}, headers=admin
    )
    newer = r.json()
    assert (await client.get(url, headers=key_header(new["key"]))).status_code == 200
    assert (await client.delete(f"{url}/{new['id']}", headers=admin)).status_code == 204
    assert (await client.get(url, headers=key_header(new["key"]))).status_code == 401
    assert (await client.get(url, headers=key_header(newer["key"]))).status_code == 200


async def test_expired_key_is_refused_even_when_cached(
    app: Any, client: httpx.AsyncClient, key_clock: KeyClock
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)
    expires = (utcnow() + dt.timedelta(hours=1)).isoformat()
    r = await client.post(
        url,
        json={"name": "short", "scopes": ["keys:manage"], "expires_at": expires},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    secret = r.json()["key"]
    assert (await client.get(url, headers=key_header(secret))).status_code == 200
    cached = await app.state.redis.get(
        cache.record_cache_key(
            tenant.id, keyfmt.key_digest(app.state.settings.secret_key.get_secret_value(), secret)
        )
    )
    assert cached is not None and str(tenant.id) in cached
    # Just before the expiry it still works; just after, the cached record refuses it without
    # a database read.
    key_clock.ahead = 3600 - 60
    assert (await client.get(url, headers=key_header(secret))).status_code == 200
    key_clock.ahead = 3600 + 1
    with sql_log(app) as statements:
        r = await client.get(url, headers=key_header(secret))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert not [s for s in statements if "key_hash IN" in s], statements
    key_clock.ahead = 0
    r = await client.post(f"{url}/{uuid.uuid4()}/rotate", headers=admin)
    assert r.status_code == 404


async def test_unknown_foreign_and_suspended(app: Any, client: httpx.AsyncClient) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    _, other, _ = await _owner_and_tenant(app)
    _, secret = await create_api_key(app, tenant)

    # A well-formed key nobody issued.
    r = await client.get(_keys_url(tenant.id), headers=key_header(keyfmt.generate_key()))
    assert r.status_code == 401 and r.json()["detail"] == "Invalid API key"
    # Valid key on another tenant's path (or a tenant that does not exist): 404, twice (cached).
    for target in (other.id, other.id, uuid.uuid4()):
        r = await client.get(_keys_url(target), headers=key_header(secret))
        assert r.status_code == 404, r.text
    assert (await client.get(_keys_url(tenant.id), headers=key_header(secret))).status_code == 200

    # Suspending the tenant reaches its keys (the tenants domain calls forget_status).
    async with app.state.sessionmaker() as s:
        await s.execute(
            update(Tenant).where(Tenant.id == tenant.id).values(status=TenantStatus.suspended)
        )
        await s.commit()
    await forget_status(app.state.redis, tenant.id)
    r = await client.get(_keys_url(tenant.id), headers=key_header(secret))
    assert r.status_code == 403 and "suspended" in r.json()["detail"]

    async with app.state.sessionmaker() as s:
        await s.execute(
            update(Tenant).where(Tenant.id == tenant.id).values(status=TenantStatus.deleting)
        )
        await s.commit()
    await forget_status(app.state.redis, tenant.id)
    assert (await client.get(_keys_url(tenant.id), headers=key_header(secret))).status_code == 404


async def test_every_redis_key_of_a_tenant_carries_its_id(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    _, other, _ = await _owner_and_tenant(app)
    _, secret = await create_api_key(app, tenant)
    authentication.forget_local_touches()
    await client.get(_keys_url(tenant.id), headers=key_header(secret))
    await client.get(_keys_url(other.id), headers=key_header(secret))
    keys = [k async for k in app.state.redis.scan_iter("atrium:*")]
    ours = [k for k in keys if "apikey" in k or k.endswith(":status")]
    assert len(ours) >= 3
    for k in ours:
        assert k.startswith((f"atrium:t:{tenant.id}:", f"atrium:t:{other.id}:")), k


# --- Validation and permissions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["fly"]}, "scopes"),
        ({"name": "  ", "scopes": ["search"]}, "name"),
        ({"name": "x", "scopes": ["search"], "expires_at": "2001-01-01T00:00:00Z"}, "future"),
        ({"name": "x", "scopes": ["search"], "expires_at": "2099-01-01T00:00:00"}, "time zone"),
        ({"name": "x", "scopes": ["search"], "rate_limit_per_minute": 0}, "rate_limit"),
        ({"name": "x", "scopes": ["search"], "owner": "me"}, "owner"),
    ],
)
async def test_create_refuses_bad_input(
    app: Any, client: httpx.AsyncClient, body: dict[str, Any], fragment: str
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    r = await client.post(_keys_url(tenant.id), json=body, headers=admin)
    assert r.status_code == 422, r.text
    assert fragment in r.text


async def test_rotate_body_is_checked(app: Any, client: httpx.AsyncClient) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    key, _ = await create_api_key(app, tenant)
    url = f"{_keys_url(tenant.id)}/{key.id}/rotate"
    r = await client.post(url, json={"grace_period_seconds": 8 * 24 * 3600}, headers=admin)
    assert r.status_code == 422
    r = await client.post(url, json={"grace_period_seconds": -1}, headers=admin)
    assert r.status_code == 422
    expired, _ = await create_api_key(app, tenant, expires_at=utcnow() - dt.timedelta(days=1))
    r = await client.post(f"{_keys_url(tenant.id)}/{expired.id}/rotate", headers=admin)
    assert r.status_code == 409 and "expired" in r.json()["detail"]


async def test_roles_and_scopes_on_key_routes(app: Any, client: httpx.AsyncClient) -> None:
    owner, tenant, admin = await _owner_and_tenant(app)
    member = await create_user(app)
    await add_member(app, tenant, member, Role.member)
    r = await client.post(
        _keys_url(tenant.id), json={"name": "x", "scopes": ["search"]}, headers=await bearer(member)
    )
    assert r.status_code == 403
    assert r.json()["detail"]["missing_permission"] == "keys:manage"

    # A key with keys:manage may create keys, only with scopes it holds itself.
    _, manager = await create_api_key(app, tenant, ["keys:manage", "search"])
    r = await client.post(
        _keys_url(tenant.id),
        json={"name": "child", "scopes": ["search", "documents:write"]},
        headers=key_header(manager),
    )
    assert r.status_code == 403
    assert r.json()["detail"]["scopes_not_held"] == ["documents:write"]
    r = await client.post(
        _keys_url(tenant.id),
        json={"name": "child", "scopes": ["search"]},
        headers=key_header(manager),
    )
    assert r.status_code == 201
    # A key without keys:manage cannot list keys.
    _, searcher = await create_api_key(app, tenant, ["search"])
    r = await client.get(_keys_url(tenant.id), headers=key_header(searcher))
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "keys:read"
    # Key ids of another tenant are not found through this tenant's path.
    _, other, _ = await _owner_and_tenant(app)
    other_key, _ = await create_api_key(app, other)
    r = await client.delete(f"{_keys_url(tenant.id)}/{other_key.id}", headers=admin)
    assert r.status_code == 404
    r = await client.delete(f"{_keys_url(other.id)}/{other_key.id}", headers=admin)
    assert r.status_code == 404
    assert owner  # the owner created nothing here


async def test_list_is_paginated(app: Any, client: httpx.AsyncClient) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    for i in range(5):
        await create_api_key(app, tenant, ["search"], name=f"k{i}")
    r = await client.get(_keys_url(tenant.id), params={"size": 2, "page": 3}, headers=admin)
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == 5 and body["pages"] == 3 and len(body["items"]) == 1
    r = await client.get(_keys_url(tenant.id), params={"size": 1000}, headers=admin)
    assert r.status_code == 422


# --- The hot path and last_used_at -----------------------------------------------------------


async def test_cached_key_costs_no_sql_and_no_request_writes(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    _, secret = await create_api_key(app, tenant)
    authentication.forget_local_touches()
    url = _keys_url(tenant.id)
    with sql_log(app) as first:
        assert (await client.get(url, headers=key_header(secret))).status_code == 200
    auth_sql = [s for s in first if "api_keys.key_hash IN" in s or "tenants.status" in s]
    assert len(auth_sql) == 2, first  # the cache misses: the key and the tenant's status
    with sql_log(app) as later:
        for _ in range(5):
            assert (await client.get(url, headers=key_header(secret))).status_code == 200
    assert not [s for s in later if "key_hash IN" in s or "tenants.status" in s], later
    writes = [s for s in first + later if s.lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert writes == []


async def _last_used(app: Any, key_id: uuid.UUID) -> dt.datetime | None:
    async with app.state.sessionmaker() as s:
        row = await s.get(ApiKey, key_id)
        assert row is not None
        return row.last_used_at


async def _wait_last_used(
    app: Any, key_id: uuid.UUID, after: dt.datetime | None, timeout: float = 30
) -> dt.datetime:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await _last_used(app, key_id)
        if value is not None and (after is None or value > after):
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("last_used_at was not written by the worker in time")


async def _drain_worker() -> None:
    """Wait until the worker has run everything sent before now (one process, FIFO)."""
    from atrium.worker import celery_app

    result = celery_app.send_task("atrium.ping", kwargs={"payload": "drain"})
    await asyncio.to_thread(result.get, timeout=30)


async def test_last_used_is_written_by_the_worker_at_most_once_a_minute(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    _, tenant, _ = await _owner_and_tenant(app)
    key, secret = await create_api_key(app, tenant)
    authentication.forget_local_touches()
    url = _keys_url(tenant.id)
    before = utcnow().replace(microsecond=0)

    with sql_log(app) as statements:
        assert (await client.get(url, headers=key_header(secret))).status_code == 200
    first = await _wait_last_used(app, key.id, None)
    assert first >= before - dt.timedelta(seconds=1)
    assert not [s for s in statements if s.lstrip().upper().startswith("UPDATE")]
    debounce = cache.touch_cache_key(tenant.id, key.id)
    assert 0 < await app.state.redis.ttl(debounce) <= authentication.TOUCH_INTERVAL_SECONDS

    # Within the minute nothing more is sent, even from a "fresh process" that lost its local
    # memory: the Redis SET NX holds. Mark the row so a stray write would show.
    sentinel = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    async with app.state.sessionmaker() as s:
        await s.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=sentinel))
        await s.commit()
    for i in range(6):
        if i == 3:
            authentication.forget_local_touches()
        assert (await client.get(url, headers=key_header(secret))).status_code == 200
    await _drain_worker()
    assert await _last_used(app, key.id) == sentinel

    # A minute later (debounce expired) the next use is recorded again.
    await app.state.redis.delete(debounce)
    authentication.forget_local_touches()
    assert (await client.get(url, headers=key_header(secret))).status_code == 200
    assert await _wait_last_used(app, key.id, sentinel) > sentinel

    r = await client.get(url, headers=key_header(secret))
    item = next(k for k in r.json()["items"] if k["id"] == str(key.id))
    assert item["last_used_at"] is not None


def test_all_scopes_helper_matches_the_enum() -> None:
    from atrium.auth.permissions import Scope

    assert sorted(ALL_SCOPES) == sorted(s.value for s in Scope)


async def test_concurrent_requests_share_lookups_and_see_revocation(
    app: Any, client: httpx.AsyncClient
) -> None:
    _, tenant, admin = await _owner_and_tenant(app)
    key, secret = await create_api_key(app, tenant, ["keys:manage"])
    url = _keys_url(tenant.id)

    async def burst(n: int) -> list[int]:
        responses = await asyncio.gather(
            *(client.get(url, headers=key_header(secret)) for _ in range(n))
        )
        return [r.status_code for r in responses]

    # A cold cache hit by 20 requests at once: the misses share a load (one query, or two when
    # a second MGET was already on its way before the first load filled the cache), not 20.
    with sql_log(app) as statements:
        assert await burst(20) == [200] * 20
    assert 1 <= len([s for s in statements if "api_keys.key_hash IN" in s]) <= 2, statements
    assert 1 <= len([s for s in statements if "tenants.status" in s]) <= 2, statements

    # Revoked between two bursts: every request of the second burst is refused.
    assert (await client.delete(f"{url}/{key.id}", headers=admin)).status_code == 204
    assert await burst(20) == [401] * 20


async def test_key_hashed_under_a_previous_secret_still_works(
    app: Any, client: httpx.AsyncClient
) -> None:
    """After ATRIUM_SECRET_KEY rotates (old one in ATRIUM_PREVIOUS_SECRET_KEYS), keys issued
    before keep working; they are read from the database each time (never cached under the
    new digest, so their revocation is seen at once)."""
    from atrium.config import load_settings

    _, tenant, _ = await _owner_and_tenant(app)
    old_secret = app.state.settings.secret_key.get_secret_value()
    key, secret = await create_api_key(app, tenant, ["search"])  # hashed under old_secret
    rotated = load_settings(
        secret_key="a-brand-new-secret-key-0123456789-0123456789",
        previous_secret_keys=old_secret,
        database_url=app.state.settings.database_url,
    )
    state = SimpleNamespace(
        settings=rotated, redis=app.state.redis, sessionmaker=app.state.sessionmaker
    )
    request: Any = SimpleNamespace(app=SimpleNamespace(state=state))

    subject = await authentication.authenticate_api_key(request, None, secret, tenant.id)
    assert subject.api_key_id == key.id and subject.can(Permission.search)
    new_digest = keyfmt.key_digest(rotated.secret_key.get_secret_value(), secret)
    assert await app.state.redis.get(cache.record_cache_key(tenant.id, new_digest)) is None

    async with app.state.sessionmaker() as s:
        await s.execute(update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=utcnow()))
        await s.commit()
    with pytest.raises(Unauthorized, match="revoked"):
        await authentication.authenticate_api_key(request, None, secret, tenant.id)


# --- A key created after someone tried it; the key-to-tenant map of /mcp ----------------------


async def test_a_key_created_or_rotated_after_a_miss_on_its_secret_works_at_once(
    app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss is remembered ("unknown", on the tenant's paths and for /mcp); creating or
    rotating a key drops those markers of its HMAC once committed, so the new key is never
    refused for ``NEGATIVE_TTL_SECONDS`` because its secret was tried before it existed."""
    _, tenant, admin = await _owner_and_tenant(app)
    url = _keys_url(tenant.id)
    request: Any = SimpleNamespace(app=app)
    created, rotated = keyfmt.generate_key(), keyfmt.generate_key()
    for secret in (created, rotated):
        assert (await client.get(url, headers=key_header(secret))).status_code == 401
        with pytest.raises(Unauthorized, match="Invalid API key"):
            await authentication.tenant_of_key(request, secret)
        digest = keyfmt.key_digest(app.state.settings.secret_key.get_secret_value(), secret)
        assert await app.state.redis.get(cache.record_cache_key(tenant.id, digest)) == "unknown"
        assert await app.state.redis.get(cache.unknown_key_cache_key(digest)) == "unknown"

    secrets = iter([created, rotated])
    monkeypatch.setattr(service, "generate_key", lambda: next(secrets))
    r = await client.post(url, json={"name": "late", "scopes": ["keys:manage"]}, headers=admin)
    assert r.status_code == 201 and r.json()["key"] == created, r.text
    assert (await client.get(url, headers=key_header(created))).status_code == 200
    assert await authentication.tenant_of_key(request, created) == tenant.id

    r = await client.post(f"{url}/{r.json()['id']}/rotate", json={}, headers=admin)
    assert r.status_code == 201 and r.json()["key"] == rotated, r.text
    assert (await client.get(url, headers=key_header(rotated))).status_code == 200
    assert await authentication.tenant_of_key(request, rotated) == tenant.id


async def test_an_unknown_key_is_read_once_then_remembered(
    app: Any, client: httpx.AsyncClient
) -> None:
    """tenant_of_key (what /mcp calls) reads the database once for many concurrent callers of
    one unknown key, then answers from the Redis marker."""
    request: Any = SimpleNamespace(app=app)
    unknown = keyfmt.generate_key()

    async def refused() -> str:
        try:
            await authentication.tenant_of_key(request, unknown)
        except Unauthorized as exc:
            return exc.message
        raise AssertionError("an unknown key was accepted")

    with sql_log(app) as statements:
        answers = await asyncio.gather(*(refused() for _ in range(50)))
        assert await refused() == "Invalid API key"
    assert set(answers) == {"Invalid API key"}
    lookups = [s for s in statements if "key_hash IN" in s]
    assert len(lookups) == 1, statements


async def test_key_tenants_are_remembered_per_app(app: Any, client: httpx.AsyncClient) -> None:
    """Two apps in one process keep their own key-to-tenant maps (on ``app.state``)."""
    from asgi_lifespan import LifespanManager

    from atrium.app import create_app

    _, tenant, _ = await _owner_and_tenant(app)
    _, secret = await create_api_key(app, tenant)
    digest = keyfmt.key_digest(app.state.settings.secret_key.get_secret_value(), secret)
    other = create_app(app.state.settings)
    here: Any = SimpleNamespace(app=app)
    there: Any = SimpleNamespace(app=other)
    async with LifespanManager(other, startup_timeout=60):
        assert await authentication.tenant_of_key(here, secret) == tenant.id
        assert app.state.apikey_tenants[digest] == tenant.id
        assert digest not in getattr(other.state, "apikey_tenants", {})
        with sql_log(other) as statements:
            for _ in range(3):
                assert await authentication.tenant_of_key(there, secret) == tenant.id
        assert len([s for s in statements if "key_hash IN" in s]) == 1, statements
        assert other.state.apikey_tenants == {digest: tenant.id}
