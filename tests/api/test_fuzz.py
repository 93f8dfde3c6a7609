"""Schema fuzzing: every operation of /openapi.json, as a user and as an API key (issue 14 §4).

Schemathesis generates requests from the app's own OpenAPI document, valid ones and invalid
ones; each goes to the live app in-process, with the session's real databases, Redis and
Celery worker behind it. Every response must pass three checks:

* ``not_a_server_error``: no status >= 500;
* ``status_code_conformance``: the status is one the operation declares;
* ``response_schema_conformance``: the body validates against the schema declared for it.

The caller is the verified owner of a tenant with a collection and a ready document, calling
with its access token, or with a full-scope API key of that tenant. Path parameters are the
real ids of that world (tenant, collection, document, key, member, invitation, session,
export) in three examples out of four and generated ones in the rest, so that requests reach
the handlers instead of stopping at a 404. Operations that would destroy the caller or the
world get fresh ones for each example (:data:`FRESH_CALLER`, :data:`FRESH_TARGETS`); no
operation is left out.

The app runs on the test's event loop (its pools belong to that loop); Hypothesis drives the
generation in a worker thread and hands each request to the loop. Examples per operation and
generation mode: ``ATRIUM_FUZZ_EXAMPLES`` (default 4). Generation is seeded so that a CI run
is reproducible; ``ATRIUM_FUZZ_SEED`` picks another sequence, and a larger budget explores
further (``ATRIUM_FUZZ_EXAMPLES=50 ATRIUM_FUZZ_SEED=$RANDOM pytest tests/api/test_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from atrium.accounts import sessions
from atrium.audit.service import Origin
from atrium.kit.db import unit_of_work
from atrium.kit.vectordb import ensure_tenant_partition
from atrium.models import Role, Tenant, User
from tests.support.apikeys import create_api_key, key_header
from tests.support.factories import add_member, bearer, create_tenant, create_user
from tests.support.quota import set_plan, superuser_headers
from tests.support.retrieval import World, create_collection, upload, wait_ready

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLES = int(os.environ.get("ATRIUM_FUZZ_EXAMPLES", "4"))
SEED = int(os.environ.get("ATRIUM_FUZZ_SEED", "20261"))
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
BASE_URL = "http://testserver"

#: Operations that end the caller's session, account or tenant: each example gets a new
#: verified user who owns a new tenant (and, for the API-key run, a key of that tenant).
FRESH_CALLER = {
    "POST /v1/auth/logout",
    "POST /v1/auth/logout-all",
    "DELETE /v1/users/me",
    "DELETE /v1/tenants/{tenant_id}",
    "POST /v1/tenants/{tenant_id}/transfer-ownership",
    "POST /v1/tenants/{tenant_id}/leave",
}

#: Operations that delete or replace what a path parameter names: each example gets a new
#: one in the caller's tenant, so the world's own stays for the other operations.
FRESH_TARGETS: dict[str, str] = {
    "DELETE /v1/tenants/{tenant_id}/api-keys/{key_id}": "key_id",
    "POST /v1/tenants/{tenant_id}/api-keys/{key_id}/rotate": "key_id",
    "DELETE /v1/tenants/{tenant_id}/collections/{collection_id}": "collection_id",
    (
        "DELETE /v1/tenants/{tenant_id}/collections/{collection_id}/documents/{document_id}"
    ): "document_id",
    "DELETE /v1/tenants/{tenant_id}/members/{user_id}": "user_id",
    "PATCH /v1/tenants/{tenant_id}/members/{user_id}": "user_id",
    "DELETE /v1/tenants/{tenant_id}/invitations/{invitation_id}": "invitation_id",
    "DELETE /v1/users/me/sessions/{session_id}": "session_id",
}


@dataclass
class Caller:
    """Who calls (``user`` or ``api-key``), with what, and the real ids of its world."""

    kind: str
    headers: dict[str, str]
    ids: dict[str, str] = field(default_factory=dict)


@dataclass
class Finding:
    """One failed check of one response."""

    operation: str
    status: int
    title: str
    detail: str


class Fuzz:
    """The world of one run, the client that calls the app, and what the run found."""

    def __init__(self, app: Any, kind: str) -> None:
        self.app = app
        self.kind = kind
        # Its own client: the fixture's re-raises the app's exceptions, a fuzzer wants the 500.
        transport = httpx.ASGITransport(
            app=app, client=("127.0.0.1", 50000), raise_app_exceptions=False
        )
        self.client = httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=120)
        self.findings: list[Finding] = []
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.world: World
        self.owner: User
        self.caller: Caller

    async def build(self) -> None:
        """The world: a tenant (created through the API) with a collection, a ready document,
        a member, an invitation, a second session and an export of its owner, and a key."""
        self.owner = await create_user(self.app)
        self.world = World(uuid.uuid4(), await bearer(self.owner))
        r = await self.client.post(
            "/v1/tenants", json={"name": f"Fuzz {self.kind}"}, headers=self.world.headers
        )
        assert r.status_code == 201, r.text
        self.world.tenant_id = uuid.UUID(r.json()["id"])
        tenant = await self._tenant(self.world.tenant_id)
        # Room for the collections, keys and members the run creates; a superuser for the
        # admin operations.
        admin = await superuser_headers(self.app)
        await set_plan(self.client, admin, tenant.id, "enterprise")
        cid = await create_collection(self.client, self.world, "fuzz")
        doc = await upload(
            self.client, self.world, "fuzz", "Fuzz", "Fuzzing finds what tests forget.", {}
        )
        await wait_ready(self.client, self.world, "fuzz", doc)
        r = await self.client.post("/v1/users/me/export", headers=self.world.headers)
        assert r.status_code == 202, r.text
        export = r.json()["id"]
        key, secret = await create_api_key(self.app, tenant, creator=self.owner)
        ids = {
            "tenant_id": str(tenant.id),
            "collection_id": str(cid),
            "document_id": str(doc),
            "export_id": export,
            "key_id": await self._fresh("key_id"),
            "user_id": await self._fresh("user_id"),
            "invitation_id": await self._fresh("invitation_id"),
            "session_id": await self._fresh("session_id"),
        }
        # The key the API-key run calls with is not among the targets: rotating it away
        # would end the run.
        del key
        headers = {"user": self.world.headers, "api-key": key_header(secret), "superuser": admin}
        self.caller = Caller(self.kind, headers[self.kind], ids)

    async def _tenant(self, tenant_id: uuid.UUID) -> Tenant:
        async with self.app.state.sessionmaker() as session:
            tenant = await session.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant  # type: ignore[no-any-return]

    async def _fresh(self, name: str) -> str:
        """A new thing of the world's tenant for path parameter ``name``."""
        # Made through the API where that is simplest, whose limits (30 invitations an hour)
        # a large ATRIUM_FUZZ_EXAMPLES would reach: they are not under test here.
        await self.reset_rate_limits()
        tenant = await self._tenant(self.world.tenant_id)
        if name == "key_id":
            key, _ = await create_api_key(self.app, tenant, creator=self.owner)
            return str(key.id)
        if name == "user_id":
            member = await create_user(self.app)
            await add_member(self.app, tenant, member, Role.member)
            return str(member.id)
        if name == "collection_id":
            r = await self.client.post(
                self.world.url("collections"),
                json={"name": f"doomed-{uuid.uuid4().hex[:8]}"},
                headers=self.world.headers,
            )
            assert r.status_code == 201, r.text
            return str(r.json()["id"])
        if name == "document_id":
            r = await self.client.post(
                self.world.url(f"collections/{self.caller.ids['collection_id']}/documents"),
                json={"title": "Doomed", "text": f"A document to delete {uuid.uuid4()}."},
                headers=self.world.headers,
            )
            assert r.status_code == 202, r.text
            return str(r.json()["documents"][0]["id"])
        if name == "invitation_id":
            r = await self.client.post(
                self.world.url("invitations"),
                json={"email": f"guest-{uuid.uuid4().hex[:8]}@example.com"},
                headers=self.world.headers,
            )
            assert r.status_code == 201, r.text
            return str(r.json()["id"])
        if name == "session_id":
            # A second session of the owner (a device), not the one the run calls with.
            async with unit_of_work(self.app.state.sessionmaker) as session:
                pair = await sessions.start_session(
                    session, self.app.state.settings, self.owner, Origin()
                )
            return str(pair.session_id)
        raise AssertionError(name)

    async def fresh_caller(self) -> Caller:
        """A new verified owner of a new tenant, as the run's kind of caller."""
        user = await create_user(self.app)
        tenant = await create_tenant(self.app, user)
        async with self.app.state.vector_pool.connection() as conn:
            await ensure_tenant_partition(conn, tenant.id)
        async with unit_of_work(self.app.state.sessionmaker) as session:
            pair = await sessions.start_session(session, self.app.state.settings, user, Origin())
        if self.kind != "api-key":
            headers = {"Authorization": f"Bearer {pair.access_token}"}
        else:
            _, secret = await create_api_key(self.app, tenant, creator=user)
            headers = key_header(secret)
        member = await create_user(self.app)
        await add_member(self.app, tenant, member, Role.member)
        ids = {"tenant_id": str(tenant.id), "user_id": str(member.id)}
        return replace(self.caller, headers=headers, ids=ids)

    async def send(self, case: schemathesis.Case, caller: Caller) -> httpx.Response:
        """Send ``case`` as ``caller``: serialized as Schemathesis would, on the app's loop."""
        kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=caller.headers)
        for unused in ("timeout", "verify", "allow_redirects", "cert", "proxies"):
            kwargs.pop(unused, None)
        prepared = requests.Session().prepare_request(requests.Request(**kwargs))
        return await self.client.request(
            prepared.method or "GET",
            prepared.url or "/",
            headers=dict(prepared.headers),
            content=prepared.body,
        )

    def run(
        self,
        op: Any,
        cases: st.SearchStrategy[Any],
        examples: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Send the examples ``cases`` draws for one operation and check each response (in a
        worker thread; requests go to the app on ``loop``)."""
        names = [p.name for p in op.path_parameters]
        fresh_target = FRESH_TARGETS.get(op.label)

        def on_loop(coro: Awaitable[Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(300)  # type: ignore[arg-type]

        @seed(SEED)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            # Failures are collected, not raised: nothing to shrink.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=cases,
            real=st.lists(st.integers(0, 3), min_size=len(names), max_size=len(names)),
            real_in_body=st.integers(0, 3),
        )
        def example(case: schemathesis.Case, real: list[int], real_in_body: int) -> None:
            caller = self.caller
            if op.label in FRESH_CALLER and self.kind != "anonymous":
                caller = on_loop(self.fresh_caller())
            for name, pick in zip(names, real, strict=True):
                if not pick:
                    continue  # one in four keeps its generated value
                if name == fresh_target and self.kind != "anonymous":
                    case.path_parameters[name] = on_loop(self._fresh(name))
                elif name in caller.ids:
                    case.path_parameters[name] = caller.ids[name]
            if real_in_body and isinstance(case.body, dict):
                # Ids in bodies too (the member an ownership transfer names...).
                for name in case.body.keys() & caller.ids.keys():
                    case.body[name] = caller.ids[name]
            response: httpx.Response = on_loop(self.send(case, caller))
            self.statuses[op.label][response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as group:  # every failed check of this response
                for failure in group.exceptions:
                    self.findings.append(
                        Finding(
                            op.label,
                            response.status_code,
                            failure.title,
                            f"{failure.message}\n    {case.method} {response.request.url}"
                            f"\n    -> {response.text[:300]}",
                        )
                    )

        example()

    async def reset_rate_limits(self) -> None:
        """Fresh rate-limit buckets, so that one operation's requests do not answer the next
        one's with 429s (each operation still meets its own limits)."""
        redis = self.app.state.redis
        for pattern in ("atrium:rl:*", "atrium:t:*:rl:*"):
            keys = [k async for k in redis.scan_iter(pattern)]
            if keys:
                await redis.delete(*keys)


def _strategies(op: Any, kind: str) -> list[st.SearchStrategy[Any]]:
    """What to draw examples from: the examples the schema declares (a valid plan name...),
    then generated valid requests, then generated invalid ones. Without credentials, valid
    requests only: the point is the 401 (or the public answer)."""
    if kind == "anonymous":
        return [op.as_strategy(generation_mode=GenerationMode.POSITIVE)]
    out = []
    examples = op.get_strategies_from_examples()
    if examples:
        out.append(st.one_of(examples))
    out.append(op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    # Without parameters or a body there is nothing to make invalid (Hypothesis would call
    # the strategy unsatisfiable).
    if any(True for _ in op.iter_parameters()) or len(op.body) > 0:
        out.append(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize("kind", ["user", "api-key", "superuser", "anonymous"])
async def test_fuzz_every_operation(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, llm_server: Any, kind: str
) -> None:
    """Every operation as the tenant's owner and as its full-scope key; the admin operations
    also as a superuser (the others refuse them with 403 before their handlers); every
    operation once or twice without credentials (the 401s).

    ``client`` is not called: it empties the tables and Redis afterwards.
    """
    started = time.monotonic()
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [op.ok() for op in schema.get_all_operations()]
    if kind == "superuser":
        operations = [op for op in operations if op.path.startswith("/v1/admin/")]
    fuzz = Fuzz(app, kind)
    if kind == "anonymous":
        fuzz.caller = Caller(kind, {})
        examples = 2
    else:
        await fuzz.build()
        examples = EXAMPLES
    loop = asyncio.get_running_loop()
    try:
        for op in operations:
            for cases in _strategies(op, kind):
                await asyncio.to_thread(fuzz.run, op, cases, examples, loop)
            await fuzz.reset_rate_limits()
    finally:
        await fuzz.client.aclose()
    requests_sent = sum(sum(c.values()) for c in fuzz.statuses.values())
    summary = Counter(f"{f.title} ({f.status})" for f in fuzz.findings)
    print(
        f"\nfuzz [{kind}]: {len(operations)} operations, {requests_sent} requests in "
        f"{time.monotonic() - started:.0f} s; findings: {dict(summary)}"
    )
    for label, counter in fuzz.statuses.items():
        print(f"  {label}: {dict(sorted(counter.items()))}")
    # Every operation was called (none left out), and with credentials every one with path
    # parameters reached its handler at least once (something other than 404 and 422).
    assert {op.label for op in operations} == set(fuzz.statuses)
    unreached = [
        label
        for label, counter in fuzz.statuses.items()
        if kind != "anonymous" and "{" in label and not set(counter) - {404, 422}
    ]
    assert not unreached, f"never reached past routing and validation: {unreached}"
    assert not fuzz.findings, _report(fuzz.findings)


def _report(findings: list[Finding]) -> str:
    """Each distinct (operation, status, check) once, with a count and its first example."""
    first: dict[tuple[str, int, str], Finding] = {}
    counts: Counter[tuple[str, int, str]] = Counter()
    for f in findings:
        key = (f.operation, f.status, f.title)
        first.setdefault(key, f)
        counts[key] += 1
    return f"{len(first)} distinct failures:\n" + "\n".join(
        f"{key[0]} -> {key[1]}: {key[2]} (x{counts[key]})\n    {first[key].detail}"
        for key in sorted(first)
    )
