"""The tenant permission dependency: 401, 404 across tenants, 403 naming the permission."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends

from atrium.app import create_app
from atrium.auth import tokens
from atrium.auth.dependencies import CurrentUser, require
from atrium.auth.permissions import (
    ROLE_PERMISSIONS,
    Permission,
    permissions_for_scopes,
)
from atrium.auth.subject import AuthSubject
from atrium.models import Role, TenantStatus
from tests.support.factories import add_member, bearer, create_tenant, create_user


@pytest.fixture
async def probe(app: Any, clean_state: None) -> Any:
    test_app = create_app(app.state.settings)

    @test_app.post("/v1/tenants/{tenant_id}/probe")
    async def probe_route(
        subject: AuthSubject = Depends(require(Permission.collections_write)),
    ) -> dict[str, str | None]:
        return {"principal": subject.principal, "role": subject.role}

    @test_app.get("/v1/me-probe")
    async def me_probe(principal: CurrentUser) -> dict[str, str]:
        return {"email": principal.user.email}

    async with LifespanManager(test_app):
        transport = httpx.ASGITransport(app=test_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield test_app, c


async def test_roles_and_tenants(probe: Any) -> None:
    app, c = probe
    owner, viewer, stranger = [await create_user(app) for _ in range(3)]
    tenant = await create_tenant(app, owner)
    await add_member(app, tenant, viewer, Role.viewer)
    other = await create_tenant(app, stranger)
    url = f"/v1/tenants/{tenant.id}/probe"

    r = await c.post(url, headers=await bearer(owner))
    assert r.status_code == 200
    assert r.json() == {"principal": f"user:{owner.id}", "role": "owner"}

    r = await c.post(url, headers=await bearer(viewer))
    assert r.status_code == 403
    assert r.json()["detail"]["missing_permission"] == "collections:write"

    r = await c.post(url, headers=await bearer(stranger))
    assert r.status_code == 404
    r = await c.post(f"/v1/tenants/{uuid.uuid4()}/probe", headers=await bearer(owner))
    assert r.status_code == 404
    r = await c.post(f"/v1/tenants/{other.id}/probe", headers=await bearer(stranger))
    assert r.status_code == 200

    r = await c.post(url)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = await c.post(url, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = await c.post(url, headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 401


async def test_suspended_tenant_says_so(probe: Any) -> None:
    app, c = probe
    owner = await create_user(app)
    tenant = await create_tenant(app, owner, status=TenantStatus.suspended)
    r = await c.post(f"/v1/tenants/{tenant.id}/probe", headers=await bearer(owner))
    assert r.status_code == 403
    assert "suspended" in r.json()["detail"]


async def test_revoked_token_and_session_are_refused_at_once(probe: Any) -> None:
    app, c = probe
    user = await create_user(app)
    headers = await bearer(user, session_id="s1")
    assert (await c.get("/v1/me-probe", headers=headers)).status_code == 200
    claims = await tokens.decode_access_token(headers["Authorization"].split()[1])
    await tokens.revoke_token(app.state.redis, claims)
    r = await c.get("/v1/me-probe", headers=headers)
    assert r.status_code == 401

    headers2 = await bearer(user, session_id="s2")
    assert (await c.get("/v1/me-probe", headers=headers2)).status_code == 200
    await tokens.revoke_sessions(app.state.redis, app.state.settings, ["s2"])
    assert (await c.get("/v1/me-probe", headers=headers2)).status_code == 401


async def test_inactive_user_and_api_key_on_user_route(probe: Any) -> None:
    app, c = probe
    user = await create_user(app)
    async with app.state.sessionmaker() as s:
        u = await s.get(type(user), user.id)
        u.is_active = False
        await s.commit()
    assert (await c.get("/v1/me-probe", headers=await bearer(user))).status_code == 401
    r = await c.get("/v1/me-probe", headers={"Authorization": "Bearer atr_something"})
    assert r.status_code == 403


def test_permission_table_is_monotonic() -> None:
    order = [Role.viewer, Role.member, Role.admin, Role.owner]
    for lower, higher in itertools.pairwise(order):
        assert ROLE_PERMISSIONS[lower] < ROLE_PERMISSIONS[higher]
    assert permissions_for_scopes(["search", "bogus"]) == frozenset({Permission.search})


async def test_more_than_one_authorization_header_is_refused(probe: Any) -> None:
    """A proxy in front may check one copy while we would read another: two headers are 401,
    even two copies of the same valid credential, on tenant routes and account routes."""
    from tests.support.apikeys import create_api_key

    app, c = probe
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    _, key = await create_api_key(app, tenant)
    token = (await bearer(owner))["Authorization"]
    url = f"/v1/tenants/{tenant.id}/probe"
    assert (await c.post(url, headers={"Authorization": token})).status_code == 200
    assert (await c.post(url, headers={"Authorization": f"Bearer {key}"})).status_code == 200
    for pair in ((token, token), (f"Bearer {key}", token), (token, "Bearer not-a-jwt")):
        headers = [("Authorization", pair[0]), ("Authorization", pair[1])]
        for r in (await c.post(url, headers=headers), await c.get("/v1/me-probe", headers=headers)):
            assert r.status_code == 401, r.text
            assert "one Authorization header" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
