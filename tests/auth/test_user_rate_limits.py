"""Every route of a signed-in person is rate-limited per user, through HTTP."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import httpx
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from tests.support.factories import DEFAULT_PASSWORD, bearer, create_user


def _calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def test_every_route_of_a_signed_in_user_is_rate_limited() -> None:
    from atrium.app import V1_ROUTER_MODULES
    from atrium.auth.dependencies import current_superuser, current_user
    from atrium.auth.user_limits import limited_user

    checked, unlimited = 0, []
    for module in V1_ROUTER_MODULES:
        for route in importlib.import_module(module).router.routes:
            if not isinstance(route, APIRoute):
                continue
            calls = list(_calls(route.dependant))
            # Superuser routes are the operators' own (admin area).
            if current_user not in calls or current_superuser in calls:
                continue
            checked += 1
            if limited_user not in calls:
                unlimited.append(f"{sorted(route.methods)} {route.path}")
    assert checked >= 10
    assert not unlimited, f"routes of a signed-in user without the per-user limit: {unlimited}"


async def test_account_routes_share_a_per_user_limit(app: Any, client: httpx.AsyncClient) -> None:
    from atrium.auth.user_limits import USER_LIMIT

    h = await bearer(await create_user(app))
    for _ in range(USER_LIMIT // 2):
        assert (await client.get("/v1/users/me", headers=h)).status_code == 200
    for _ in range(USER_LIMIT - USER_LIMIT // 2):
        assert (await client.get("/v1/tenants", headers=h)).status_code == 200
    r = await client.get("/v1/users/me/sessions", headers=h)
    assert r.status_code == 429, r.text
    assert int(r.headers["Retry-After"]) > 0
    assert r.headers["X-RateLimit-Limit"] == str(USER_LIMIT)
    # Per user, not per address: someone else on the same address is served.
    other = await bearer(await create_user(app))
    assert (await client.get("/v1/users/me", headers=other)).status_code == 200
    # Nothing is counted before authentication: a bad token is still a 401.
    r = await client.get("/v1/users/me", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


async def test_password_checks_are_limited_per_user(app: Any, client: httpx.AsyncClient) -> None:
    # A stolen access token must not let anyone guess the password behind it.
    h = await bearer(await create_user(app))
    wrong = {"current_password": "not it at all", "new_password": "another fine passphrase"}
    for _ in range(10):
        r = await client.post("/v1/users/me/password", json=wrong, headers=h)
        assert r.status_code == 403, r.text
    right = {"current_password": DEFAULT_PASSWORD, "new_password": "another fine passphrase"}
    r = await client.post("/v1/users/me/password", json=right, headers=h)
    assert r.status_code == 429, r.text
    assert r.headers["X-RateLimit-Limit"] == "10"
    # The other routes that check the password share the bucket.
    r = await client.post(
        "/v1/users/me/email",
        json={"new_email": "elsewhere@example.com", "password": DEFAULT_PASSWORD},
        headers=h,
    )
    assert r.status_code == 429, r.text
    r = await client.request("DELETE", "/v1/users/me", json={"password": "guess"}, headers=h)
    assert r.status_code == 429, r.text


async def test_data_exports_are_limited_per_user(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    h = await bearer(await create_user(app))
    for _ in range(5):
        r = await client.post("/v1/users/me/export", headers=h)
        assert r.status_code == 202, r.text
    r = await client.post("/v1/users/me/export", headers=h)
    assert r.status_code == 429, r.text
    assert r.headers["X-RateLimit-Limit"] == "5"
