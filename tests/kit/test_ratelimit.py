"""Rate limits: a bucket per identifier, 429 with Retry-After, X-RateLimit-* on every response."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import APIRouter, Depends, Form, Request

from atrium.kit.errors import NotFound
from atrium.kit.ratelimit import admit, hit, rate_limit, request_states, tenant_bucket
from atrium.kit.ratelimit_identifiers import by_field, by_ip

TENANT = str(uuid.uuid4())


def _routes() -> APIRouter:
    router = APIRouter(prefix="/_rltest")

    @router.get("/ip", dependencies=[Depends(rate_limit("rltest-ip", 3, 60, key=by_ip))])
    async def per_ip() -> dict[str, bool]:
        return {"ok": True}

    @router.post(
        "/login",
        dependencies=[Depends(rate_limit("rltest-email", 2, 60, key=by_field("username")))],
    )
    async def login(username: str = Form(...)) -> dict[str, str]:
        return {"user": username}

    @router.post(
        "/forgot", dependencies=[Depends(rate_limit("rltest-json", 1, 60, key=by_field("email")))]
    )
    async def forgot(body: dict[str, Any]) -> dict[str, bool]:
        return {"ok": True}

    @router.get("/missing", dependencies=[Depends(rate_limit("rltest-err", 5, 60))])
    async def missing() -> None:
        raise NotFound("nothing here")

    @router.get("/unlimited")
    async def unlimited() -> dict[str, bool]:
        return {"ok": True}

    return router


@pytest.fixture(scope="module")
async def rl_app(test_env: dict[str, Any]) -> AsyncIterator[Any]:
    from atrium.app import create_app

    app = create_app()
    app.include_router(_routes(), prefix="/v1")

    @app.get("/v1/_rltest/tenant/{kind}/{sid}")
    async def tenant_route(kind: str, sid: str, request: Request) -> dict[str, bool]:
        bucket = tenant_bucket(tenant_id=TENANT, kind=kind, subject_id=sid, per_minute=2)
        assert bucket is not None
        admit(await hit(request.app.state.redis, bucket), request_states(request))
        return {"ok": True}

    async with LifespanManager(app, startup_timeout=60):
        yield app


def _client(app: Any, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_per_ip_limit_headers_and_retry_after(rl_app: Any, clean_state: None) -> None:
    async with _client(rl_app, "10.0.0.1") as a, _client(rl_app, "10.0.0.2") as b:
        remaining = []
        for _ in range(3):
            r = await a.get("/v1/_rltest/ip")
            assert r.status_code == 200
            assert r.headers["X-RateLimit-Limit"] == "3"
            assert 0 < int(r.headers["X-RateLimit-Reset"]) <= 60
            assert "Retry-After" not in r.headers
            remaining.append(int(r.headers["X-RateLimit-Remaining"]))
        assert remaining == [2, 1, 0]

        refused = await a.get("/v1/_rltest/ip")
        assert refused.status_code == 429
        body = refused.json()
        assert body["error"] == "TooManyRequests"
        assert body["detail"]["limit"] == 3
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["X-RateLimit-Reset"]) == retry_after

        # Another address has its own bucket: fastapi-limiter 0.2 would have shared one.
        other = await b.get("/v1/_rltest/ip")
        assert other.status_code == 200
        assert other.headers["X-RateLimit-Remaining"] == "2"


async def test_refused_requests_are_not_counted(rl_app: Any, clean_state: None) -> None:
    redis = rl_app.state.redis
    async with _client(rl_app, "10.0.0.3") as c:
        for _ in range(6):
            await c.get("/v1/_rltest/ip")
    keys = [k async for k in redis.scan_iter("atrium:rl:rltest-ip:*")]
    assert keys == ["atrium:rl:rltest-ip:ip:10.0.0.3"]
    assert await redis.zcard(keys[0]) == 3
    assert 0 < await redis.pttl(keys[0]) <= 61_000


async def test_per_account_limit_by_form_field(rl_app: Any, clean_state: None) -> None:
    async with _client(rl_app) as c:
        for _ in range(2):
            r = await c.post("/v1/_rltest/login", data={"username": "Ann@Example.com"})
            assert r.status_code == 200
        # Same account, different spelling: same bucket.
        r = await c.post("/v1/_rltest/login", data={"username": " ann@example.com"})
        assert r.status_code == 429
        assert "Retry-After" in r.headers
        # Another account is not affected.
        r = await c.post("/v1/_rltest/login", data={"username": "bob@example.com"})
        assert r.status_code == 200
    # The address is hashed, never stored in Redis in clear.
    keys = [k async for k in rl_app.state.redis.scan_iter("atrium:rl:rltest-email:*")]
    assert len(keys) == 2
    assert all("example.com" not in k for k in keys)


async def test_per_account_limit_by_json_field(rl_app: Any, clean_state: None) -> None:
    async with _client(rl_app) as c:
        assert (await c.post("/v1/_rltest/forgot", json={"email": "a@x.io"})).status_code == 200
        assert (await c.post("/v1/_rltest/forgot", json={"email": "a@x.io"})).status_code == 429
        assert (await c.post("/v1/_rltest/forgot", json={"email": "b@x.io"})).status_code == 200


async def test_headers_on_error_responses_of_limited_routes(rl_app: Any, clean_state: None) -> None:
    async with _client(rl_app) as c:
        r = await c.get("/v1/_rltest/missing")
    assert r.status_code == 404
    assert r.headers["X-RateLimit-Limit"] == "5"
    assert r.headers["X-RateLimit-Remaining"] == "4"


async def test_unlimited_route_has_no_rate_headers(rl_app: Any, clean_state: None) -> None:
    async with _client(rl_app) as c:
        r = await c.get("/v1/_rltest/unlimited")
    assert r.status_code == 200
    assert "X-RateLimit-Limit" not in r.headers


async def test_subject_buckets_are_per_key_and_tenant_scoped(
    rl_app: Any, clean_state: None
) -> None:
    async with _client(rl_app) as c:
        for _ in range(2):
            assert (await c.get("/v1/_rltest/tenant/key/k1")).status_code == 200
        refused = await c.get("/v1/_rltest/tenant/key/k1")
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        # A second key of the same tenant is not slowed down by the first.
        ok = await c.get("/v1/_rltest/tenant/key/k2")
        assert ok.status_code == 200
        assert ok.headers["X-RateLimit-Remaining"] == "1"
        assert (await c.get("/v1/_rltest/tenant/user/k1")).status_code == 200
    keys = sorted([k async for k in rl_app.state.redis.scan_iter("atrium:t:*")])
    assert keys == [
        f"atrium:t:{TENANT}:rl:key:k1",
        f"atrium:t:{TENANT}:rl:key:k2",
        f"atrium:t:{TENANT}:rl:user:k1",
    ]


# Tenant routes: the real app, real API keys and users, limits from the plan -----------------


async def _key(app: Any, tenant_id: Any, rpm: int | None = None) -> dict[str, str]:
    from atrium.apikeys.service import issue_key

    async with app.state.sessionmaker() as s:
        _, secret = await issue_key(
            s,
            app.state.settings,
            tenant_id,
            name="k",
            scopes=["usage:read"],
            rate_limit_per_minute=rpm,
        )
        await s.commit()
    return {"Authorization": f"Bearer {secret}"}


async def test_two_api_keys_never_share_a_bucket(app: Any, client: httpx.AsyncClient) -> None:
    from tests.support.factories import create_tenant, create_user

    tenant = await create_tenant(app, await create_user(app))
    slow = await _key(app, tenant.id, rpm=2)  # the key's own limit
    other = await _key(app, tenant.id)  # the free plan's 60 per minute per key
    url = f"/v1/tenants/{tenant.id}/usage"
    for expected in (1, 0):
        r = await client.get(url, headers=slow)
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit"] == "2"
        assert r.headers["X-RateLimit-Remaining"] == str(expected)
    refused = await client.get(url, headers=slow)
    assert refused.status_code == 429
    assert refused.json()["error"] == "TooManyRequests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"

    r = await client.get(url, headers=other)
    assert r.status_code == 200
    assert r.headers["X-RateLimit-Limit"] == "60"
    assert r.headers["X-RateLimit-Remaining"] == "59"
    keys = [k async for k in app.state.redis.scan_iter(f"atrium:t:{tenant.id}:rl:*")]
    assert len(keys) == 2


async def test_plan_limits_apply_per_key_and_per_user(app: Any, client: httpx.AsyncClient) -> None:
    from atrium.models import Role
    from tests.support.factories import add_member, bearer, create_tenant, create_user
    from tests.support.quota import set_plan, superuser_headers

    owner = await create_user(app)
    colleague = await create_user(app)
    tenant = await create_tenant(app, owner)
    await add_member(app, tenant, colleague, Role.viewer)
    admin = await superuser_headers(app)
    await set_plan(
        client,
        admin,
        tenant.id,
        "pro",
        {"requests_per_minute_per_key": 3, "requests_per_minute_per_user": 2},
    )
    url = f"/v1/tenants/{tenant.id}/usage"

    key = await _key(app, tenant.id)
    assert [(await client.get(url, headers=key)).status_code for _ in range(4)] == [
        200,
        200,
        200,
        429,
    ]
    owner_h, colleague_h = await bearer(owner), await bearer(colleague)
    assert [(await client.get(url, headers=owner_h)).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    # Another person of the same tenant has a bucket of their own.
    r = await client.get(url, headers=colleague_h)
    assert r.status_code == 200
    assert r.headers["X-RateLimit-Limit"] == "2"

    # Refused for another reason (a missing permission): the limit headers are still there.
    r = await client.get(f"/v1/tenants/{tenant.id}/audit-events", headers=colleague_h)
    assert r.status_code == 403
    assert r.headers["X-RateLimit-Remaining"] == "0"


# Per-account limits cannot be dodged (issue 13, finding 4) ------------------------------------

# (route, the limited field, the per-address limit, how the body is sent)
ACCOUNT_ROUTES = [
    ("/v1/auth/login", "username", 10, "Application/x-www-form-urlencoded"),
    ("/console/session/login", "username", 10, "APPLICATION/JSON"),
    ("/v1/auth/register", "email", 5, "APPLICATION/JSON"),
    ("/v1/auth/forgot-password", "email", 5, "APPLICATION/JSON"),
    ("/v1/auth/request-verify-token", "email", 5, "APPLICATION/JSON; Charset=UTF-8"),
]


async def _account_post(
    client: httpx.AsyncClient, path: str, content_type: str, body: dict[str, str]
) -> httpx.Response:
    import json
    from urllib.parse import urlencode

    headers = {"content-type": content_type}
    if path.startswith("/console/"):
        from tests.support.console import csrf
        from tests.support.console import headers as console_headers

        headers.update(console_headers(await csrf(client)))
    form = "x-www-form-urlencoded" in content_type.lower()
    content = urlencode(body) if form else json.dumps(body)
    return await client.post(path, content=content, headers=headers)


@pytest.mark.parametrize(("path", "field", "limit", "content_type"), ACCOUNT_ROUTES)
async def test_upper_case_media_types_do_not_skip_the_per_address_limit(
    client: httpx.AsyncClient, path: str, field: str, limit: int, content_type: str
) -> None:
    # The routes parse these bodies (media types are case-insensitive), so the per-address
    # limit must count them: it used to compare the media type case-sensitively and skip it.
    body = {field: "victim@example.com", "password": "Not-the-password-123"}
    for _ in range(limit):
        r = await _account_post(client, path, content_type, body)
        # Parsed and validated by the route (not a 422): the route accepts this media type.
        assert r.status_code not in (422, 429), r.text
    refused = await _account_post(client, path, content_type, body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["detail"]["limit"] == limit
    assert int(refused.headers["Retry-After"]) >= 1


async def test_requests_without_a_readable_field_share_one_bucket(
    client: httpx.AsyncClient, app: Any
) -> None:
    # Absent field, wrong type, not an object, an unknown media type: limited all the same.
    # (Broken JSON never reaches the limits: FastAPI refuses it before any dependency runs.)
    bodies: list[tuple[bytes, str]] = [
        (b'{"mail": "a@example.com"}', "application/json"),
        (b'{"email": 42}', "application/json"),
        (b'["a@example.com"]', "application/json"),
        (b"email=a@example.com", "text/plain"),
        (b'{"email": "   "}', "application/json"),
    ]
    for content, content_type in bodies:
        r = await client.post(
            "/v1/auth/forgot-password", content=content, headers={"content-type": content_type}
        )
        assert r.status_code == 422, r.text
    refused = await client.post("/v1/auth/forgot-password", content=b"{}")
    assert refused.status_code == 429
    keys = [k async for k in app.state.redis.scan_iter("atrium:rl:forgot-password-email:*")]
    assert keys == ["atrium:rl:forgot-password-email:email:missing"]
    # A real address still has its own bucket.
    ok = await client.post("/v1/auth/forgot-password", json={"email": "someone@example.com"})
    assert ok.status_code == 202


async def test_accents_and_case_of_an_address_share_its_bucket(
    rl_app: Any, clean_state: None
) -> None:
    async with _client(rl_app) as c:
        for spelling in ("Ann@Example.com", "ANN@EXAMPLE.COM"):
            r = await c.post("/v1/_rltest/login", data={"username": spelling})
            assert r.status_code == 200
        # Accent-insensitive collations would find the same account: same bucket.
        r = await c.post("/v1/_rltest/login", data={"username": "ánn@exámple.com"})
        assert r.status_code == 429


# IPv6 clients by /64 (issue 13, finding 15) -------------------------------------------------


async def test_ipv6_clients_are_limited_per_64_and_mapped_ipv4_as_ipv4(
    rl_app: Any, clean_state: None
) -> None:
    same_64 = ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2:abcd::9"]
    for ip in same_64:
        async with _client(rl_app, ip) as c:
            assert (await c.get("/v1/_rltest/ip")).status_code == 200
    # A fourth address of the same /64 is the same client: refused.
    async with _client(rl_app, "2001:db8:1:2:1234::1") as c:
        assert (await c.get("/v1/_rltest/ip")).status_code == 429
    # The next /64 is someone else.
    async with _client(rl_app, "2001:db8:1:3::1") as c:
        assert (await c.get("/v1/_rltest/ip")).status_code == 200

    # An IPv4-mapped address is its IPv4 client.
    for ip in ("10.7.7.7", "::ffff:10.7.7.7", "::ffff:a07:707"):
        async with _client(rl_app, ip) as c:
            assert (await c.get("/v1/_rltest/ip")).status_code == 200
    async with _client(rl_app, "10.7.7.7") as c:
        assert (await c.get("/v1/_rltest/ip")).status_code == 429
    keys = sorted([k async for k in rl_app.state.redis.scan_iter("atrium:rl:rltest-ip:*")])
    assert keys == [
        "atrium:rl:rltest-ip:ip:10.7.7.7",
        "atrium:rl:rltest-ip:ip:2001:db8:1:2::/64",
        "atrium:rl:rltest-ip:ip:2001:db8:1:3::/64",
    ]
