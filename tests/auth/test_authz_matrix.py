"""The authorization matrix, built from the application's own route table.

Every route under ``/tenants/{tenant_id}`` (except the superuser ``/v1/admin/...`` routes) must
name exactly one permission with ``require(...)``. Each is called, through HTTP, by every kind of
caller that must be refused (and by the callers that must get through), and each answer is
checked: another tenant's people and keys get 404, a missing role or scope gets 403 naming the
permission, missing, expired and revoked credentials get 401.

New routes are covered the moment they are mounted: nothing here lists routes by hand.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import iter_route_contexts
from sqlalchemy import update

from atrium.auth.dependencies import require
from atrium.auth.permissions import (
    PERMISSION_HELP,
    ROLE_PERMISSIONS,
    SCOPE_PERMISSIONS,
    Permission,
    Scope,
    permission_table_markdown,
)
from atrium.auth.subject import AuthSubject
from atrium.mcp_server import MCP_PATH
from atrium.mcp_server.tools import TOOL_PERMISSIONS
from atrium.models import Role, Tenant, TenantStatus, User, utcnow
from atrium.tenants.status import forget_status
from tests.support.apikeys import ALL_SCOPES, create_api_key, key_header
from tests.support.factories import add_member, bearer, create_tenant, create_user

_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-zA-Z_]+)?}")
_SKIP_METHODS = {"HEAD", "OPTIONS"}
DOCS = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "authorization.md"


@dataclass(frozen=True)
class TenantRoute:
    """One method of one tenant route, with what ``require`` demands (None: nothing)."""

    method: str
    path: str
    name: str
    permissions: tuple[Permission, ...]
    dependant: Dependant | None
    has_body: bool

    @property
    def label(self) -> str:
        return f"{self.method} {self.path} ({self.name})"


def _requires(dependant: Dependant | None) -> Iterator[require]:
    """Every ``require(...)`` in a dependant tree."""
    if dependant is None:
        return
    for sub in dependant.dependencies:
        if isinstance(sub.call, require):
            yield sub.call
        yield from _requires(sub)


def _param_types(dependant: Dependant | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if dependant is None:
        return out
    for p in dependant.path_params:
        out.setdefault(p.name, p.field_info.annotation)
    for sub in dependant.dependencies:
        for k, v in _param_types(sub).items():
            out.setdefault(k, v)
    return out


def _has_body(dependant: Dependant | None) -> bool:
    if dependant is None:
        return False
    return bool(dependant.body_params) or any(_has_body(s) for s in dependant.dependencies)


def tenant_routes(app: FastAPI) -> list[TenantRoute]:
    """Every method of every tenant route of ``app`` (superuser routes excluded)."""
    out: list[TenantRoute] = []
    for ctx in iter_route_contexts(app.routes):
        path = ctx.path_format or ""
        methods = ctx.methods
        if "{tenant_id}" not in path or path.startswith("/v1/admin/") or not methods:
            continue
        dependant = getattr(ctx, "dependant", None)
        perms = tuple(dict.fromkeys(r.permission for r in _requires(dependant)))
        for method in sorted(set(methods) - _SKIP_METHODS):
            out.append(
                TenantRoute(
                    method=method,
                    path=path,
                    name=ctx.name or "?",
                    permissions=perms,
                    dependant=dependant,
                    has_body=_has_body(dependant),
                )
            )
    return out


def route_problems(routes: list[TenantRoute]) -> list[str]:
    """Routes that do not name exactly one permission of the table."""
    problems = []
    granted = frozenset().union(*ROLE_PERMISSIONS.values(), *SCOPE_PERMISSIONS.values())
    for r in routes:
        if not r.permissions:
            problems.append(f"{r.label}: no require(Permission.x) dependency")
        elif len(r.permissions) > 1:
            names = ", ".join(p.value for p in r.permissions)
            problems.append(f"{r.label}: several permissions required ({names}); name one")
        elif r.permissions[0] not in granted:
            problems.append(
                f"{r.label}: permission {r.permissions[0].value!r} is granted by no role or "
                "scope in auth/permissions.py"
            )
    return problems


def fill_path(route: TenantRoute, tenant_id: uuid.UUID) -> str:
    """The route's path with the tenant filled in and every other parameter made up."""
    types = _param_types(route.dependant)

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "tenant_id":
            return str(tenant_id)
        annotation = types.get(name)
        if annotation is int:
            return "1"
        if annotation is str:
            return f"x{uuid.uuid4().hex[:8]}"
        return str(uuid.uuid4())

    return _PARAM.sub(value, route.path)


class StateSpy:
    """ASGI wrapper that keeps each request's ``scope["state"]`` (where ``require`` leaves the
    resolved subject), so the test can tell "authorized" from any other answer."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last_state: dict[str, Any] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.last_state = {}
            scope["state"] = self.last_state
        await self.app(scope, receive, send)


# --- The route table itself ------------------------------------------------------------------


def test_every_tenant_route_names_one_permission_of_the_table(app: Any) -> None:
    routes = tenant_routes(app)
    assert routes, "no tenant routes found: is the route table walked correctly?"
    problems = route_problems(routes)
    assert not problems, "Tenant routes without a valid permission:\n  " + "\n  ".join(problems)


def test_a_route_without_require_is_reported_by_name() -> None:
    probe = FastAPI()
    router = APIRouter(prefix="/tenants/{tenant_id}")

    @router.get("/forgotten")
    async def forgotten_route(tenant_id: uuid.UUID) -> None:
        return None

    @router.get("/greedy")
    async def greedy_route(
        a: AuthSubject = Depends(require(Permission.search)),
        b: AuthSubject = Depends(require(Permission.answer)),
    ) -> None:
        return None

    @router.get("/fine", dependencies=[Depends(require(Permission.search))])
    async def fine_route() -> None:
        return None

    @probe.get("/v1/admin/tenants/{tenant_id}")
    async def admin_route(tenant_id: uuid.UUID) -> None:
        return None

    probe.include_router(router, prefix="/v1")
    routes = tenant_routes(probe)
    assert {r.name for r in routes} == {"forgotten_route", "greedy_route", "fine_route"}
    problems = route_problems(routes)
    assert len(problems) == 2
    assert any("forgotten_route" in p and "no require" in p for p in problems)
    assert any("greedy_route" in p and "several" in p for p in problems)


def test_permission_table_is_complete_and_documented() -> None:
    assert set(PERMISSION_HELP) == set(Permission), "describe every permission in PERMISSION_HELP"
    assert set(SCOPE_PERMISSIONS) == set(Scope)
    for scope, perms in SCOPE_PERMISSIONS.items():
        # A key never holds what no role may do: creating one must not escalate.
        assert perms <= ROLE_PERMISSIONS[Role.admin], scope
    text = DOCS.read_text()
    begin, end = "<!-- BEGIN permission table -->\n", "<!-- END permission table -->"
    assert begin in text and end in text
    documented = text.split(begin, 1)[1].split(end, 1)[0]
    assert documented == permission_table_markdown(), (
        "docs/authorization.md is out of date with auth/permissions.py; regenerate the table with "
        '`python -c "from atrium.auth.permissions import permission_table_markdown as t; '
        'print(t(), end=str())"` and paste it between the markers'
    )


# --- The matrix ------------------------------------------------------------------------------


@dataclass
class Cast:
    """The people and keys the matrix calls with."""

    victim: Tenant
    other_admin: dict[str, str]
    other_key: dict[str, str]
    viewer: dict[str, str]
    expired_key: dict[str, str]
    revoked_key: dict[str, str]
    owner: User
    viewer_user: User


async def _cast(app: Any) -> Cast:
    owner, viewer, stranger = [await create_user(app) for _ in range(3)]
    victim = await create_tenant(app, owner)
    await add_member(app, victim, viewer, Role.viewer)
    other = await create_tenant(app)
    await add_member(app, other, stranger, Role.admin)
    _, other_secret = await create_api_key(app, other, creator=stranger)
    _, expired = await create_api_key(
        app, victim, expires_at=utcnow() - dt.timedelta(minutes=1), creator=owner
    )
    _, revoked = await create_api_key(app, victim, revoked=True, creator=owner)
    return Cast(
        victim=victim,
        other_admin=await bearer(stranger),
        other_key=key_header(other_secret),
        viewer=await bearer(viewer),
        expired_key=key_header(expired),
        revoked_key=key_header(revoked),
        owner=owner,
        viewer_user=viewer,
    )


def _scopes_without(permission: Permission) -> tuple[list[str], bool]:
    """Every scope that does not grant ``permission``; and whether any scope grants it."""
    lacking = [s.value for s in Scope if permission not in SCOPE_PERMISSIONS[s]]
    return lacking, len(lacking) < len(ALL_SCOPES)


@pytest.fixture
async def spy_client(app: Any, clean_state: None) -> Any:
    spy = StateSpy(app)
    transport = httpx.ASGITransport(app=spy, client=("127.0.0.1", 50001))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield spy, c


async def test_authorization_matrix_over_every_tenant_route(app: Any, spy_client: Any) -> None:
    spy, client = spy_client
    routes = [r for r in tenant_routes(app) if len(r.permissions) == 1]
    assert routes
    cast = await _cast(app)
    failures: list[str] = []
    scopeless_keys: dict[Permission, dict[str, str]] = {}

    async def call(route: TenantRoute, tenant_id: uuid.UUID, headers: dict[str, str]) -> Any:
        kwargs: dict[str, Any] = {"headers": headers}
        if route.has_body:
            kwargs["json"] = {}
        return await client.request(route.method, fill_path(route, tenant_id), **kwargs)

    def expect(route: TenantRoute, who: str, r: httpx.Response, status: int) -> None:
        if r.status_code != status:
            failures.append(
                f"{route.label} as {who}: {r.status_code} {r.text[:200]}, expected {status}"
            )
        elif spy.last_state.get("subject") is not None:
            failures.append(f"{route.label} as {who}: {status} but the subject was authorized")

    def expect_missing(route: TenantRoute, who: str, r: httpx.Response) -> None:
        perm = route.permissions[0].value
        expect(route, who, r, 403)
        if r.status_code == 403:
            detail = r.json().get("detail")
            if not (isinstance(detail, dict) and detail.get("missing_permission") == perm):
                failures.append(f"{route.label} as {who}: 403 without naming {perm!r}: {detail}")

    def expect_allowed(route: TenantRoute, who: str, r: httpx.Response, tenant: Tenant) -> None:
        subject = spy.last_state.get("subject")
        if r.status_code in (401, 403) or subject is None or subject.tenant_id != tenant.id:
            failures.append(f"{route.label} as {who}: refused ({r.status_code} {r.text[:200]})")

    # Refusals, all against one tenant: none of these may reach a handler.
    for route in routes:
        perm = route.permissions[0]
        victim = cast.victim.id
        expect(route, "another tenant's admin", await call(route, victim, cast.other_admin), 404)
        expect(route, "another tenant's key", await call(route, victim, cast.other_key), 404)
        expect(route, "no credentials", await call(route, victim, {}), 401)
        expect(route, "an expired key", await call(route, victim, cast.expired_key), 401)
        expect(route, "a revoked key", await call(route, victim, cast.revoked_key), 401)
        if perm not in scopeless_keys:
            lacking, grantable = _scopes_without(perm)
            # A high per-key limit: require() counts the rate limit before the permission,
            # and this key is used on every route that needs ``perm``.
            _, secret = await create_api_key(
                app,
                cast.victim,
                lacking if grantable else ALL_SCOPES,
                creator=cast.owner,
                rate_limit_per_minute=1_000_000,
            )
            scopeless_keys[perm] = key_header(secret)
        expect_missing(
            route, "a key without the scope", await call(route, victim, scopeless_keys[perm])
        )
        if perm not in ROLE_PERMISSIONS[Role.viewer]:
            expect_missing(route, "a viewer", await call(route, victim, cast.viewer))

    # Callers that must get through, each route on a fresh tenant (handlers run, and may
    # change or delete what they touch): a viewer when the role allows it, a key with every
    # scope when a scope grants it, the owner last.
    for route in routes:
        perm = route.permissions[0]
        tenant = await create_tenant(app, cast.owner)
        if perm in ROLE_PERMISSIONS[Role.viewer]:
            await add_member(app, tenant, cast.viewer_user, Role.viewer)
            r = await call(route, tenant.id, cast.viewer)
            expect_allowed(route, "a viewer", r, tenant)
        if _scopes_without(perm)[1]:
            _, secret = await create_api_key(app, tenant, creator=cast.owner)
            r = await call(route, tenant.id, key_header(secret))
            expect_allowed(route, "a key with every scope", r, tenant)
        if perm in ROLE_PERMISSIONS[Role.owner]:
            r = await call(route, tenant.id, await bearer(cast.owner))
            expect_allowed(route, "the owner", r, tenant)

    assert not failures, (
        f"{len(failures)} authorization failures over {len(routes)} tenant routes:\n  "
        + "\n  ".join(failures)
    )


# --- /mcp: the MCP endpoint ------------------------------------------------------------------
#
# One endpoint for every tool, and no tenant in its path: the API key names the tenant. The
# key is authenticated (401, or 403 for a suspended tenant) before any MCP handling; each tool
# then checks its one permission (TOOL_PERMISSIONS) and refuses with a tool error naming it.

MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": "2025-06-18",
}


def _rpc(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        body["params"] = params
    return body


def _made_up_arguments(schema: dict[str, Any]) -> dict[str, Any]:
    """A value for each required argument of a tool, from its input schema."""
    out: dict[str, Any] = {}
    for name in schema.get("required", []):
        prop = schema["properties"][name]
        if prop.get("format") == "uuid":
            out[name] = str(uuid.uuid4())
        elif prop.get("type") == "integer":
            out[name] = 1
        else:
            out[name] = "anything"
    return out


async def test_mcp_tools_are_authorized_like_the_routes(app: Any, spy_client: Any) -> None:
    spy, client = spy_client
    cast = await _cast(app)
    _, lister = await create_api_key(app, cast.victim, creator=cast.owner)
    r = await client.post(
        MCP_PATH, json=_rpc("tools/list"), headers={**MCP_HEADERS, **key_header(lister)}
    )
    assert r.status_code == 200, r.text
    listed = r.json()["result"]["tools"]
    tools = {t["name"]: t["inputSchema"] for t in listed}
    # Every tool the server offers names one permission a scope grants, and tells the model
    # which scope that is.
    assert set(tools) == set(TOOL_PERMISSIONS)
    for t in listed:
        perm = TOOL_PERMISSIONS[t["name"]]
        assert _scopes_without(perm)[1], t["name"]
        scopes = [s.value for s in Scope if perm in SCOPE_PERMISSIONS[s]]
        assert any(f"'{s}'" in t["description"] for s in scopes), (t["name"], scopes)

    failures: list[str] = []

    async def call(tool: str, headers: dict[str, str]) -> httpx.Response:
        body = _rpc("tools/call", {"name": tool, "arguments": _made_up_arguments(tools[tool])})
        return await client.post(MCP_PATH, json=body, headers={**MCP_HEADERS, **headers})

    def refused(tool: str, who: str, r: httpx.Response, status: int) -> None:
        if r.status_code != status or r.json().get("error") is None:
            failures.append(f"{tool} as {who}: {r.status_code} {r.text[:200]}, expected {status}")
        elif spy.last_state.get("subject") is not None:
            failures.append(f"{tool} as {who}: {status} but the subject was authorized")

    def result(tool: str, who: str, r: httpx.Response) -> dict[str, Any]:
        if r.status_code != 200 or "result" not in r.json():
            failures.append(f"{tool} as {who}: {r.status_code} {r.text[:200]}, expected a result")
            return {}
        return r.json()["result"]  # type: ignore[no-any-return]

    for tool, perm in TOOL_PERMISSIONS.items():
        refused(tool, "no credentials", await call(tool, {}), 401)
        refused(tool, "an expired key", await call(tool, cast.expired_key), 401)
        refused(tool, "a revoked key", await call(tool, cast.revoked_key), 401)
        refused(tool, "a member's access token", await call(tool, cast.viewer), 401)

        lacking, _ = _scopes_without(perm)
        _, secret = await create_api_key(app, cast.victim, lacking, creator=cast.owner)
        out = result(tool, "a key without the scope", await call(tool, key_header(secret)))
        detail = (out.get("structuredContent") or {}).get("detail")
        if out and not (
            out.get("isError")
            and isinstance(detail, dict)
            and detail.get("missing_permission") == perm.value
        ):
            failures.append(f"{tool} as a key without the scope: not refused naming {perm}: {out}")

        # Keys act on their own tenant only (another tenant's key included): nothing in a
        # call can name a different one.
        for who, headers, tenant_id in (
            ("another tenant's key", cast.other_key, None),
            ("a key with every scope", key_header(lister), cast.victim.id),
        ):
            out = result(tool, who, await call(tool, headers))
            subject = spy.last_state.get("subject")
            error = (out.get("structuredContent") or {}).get("error")
            if out and (error == "Forbidden" or subject is None):
                failures.append(f"{tool} as {who}: refused: {out}")
            elif subject is not None and (subject.tenant_id == cast.victim.id) != bool(tenant_id):
                failures.append(f"{tool} as {who}: acted on tenant {subject.tenant_id}")

    # A suspended tenant's keys are refused before any tool runs, as on the routes.
    async with app.state.sessionmaker() as s:
        await s.execute(
            update(Tenant).where(Tenant.id == cast.victim.id).values(status=TenantStatus.suspended)
        )
        await s.commit()
    await forget_status(app.state.redis, cast.victim.id)
    r = await call("search", key_header(lister))
    refused("search", "a suspended tenant's key", r, 403)
    assert "suspended" in r.json()["detail"]

    assert not failures, f"{len(failures)} MCP authorization failures:\n  " + "\n  ".join(failures)
