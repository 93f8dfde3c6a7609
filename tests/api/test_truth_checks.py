"""Claims other tests made without proving them (issue 19, "Tests that claim more than they
prove"): exports carry no secret of a tenant that has some, expired access tokens are refused,
one tenant's cached search or answer never reaches another, and plan limits are exact under
concurrency on the real search and upload routes."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
import zipfile
from typing import Any

import httpx
import jwt
from sqlalchemy import func, select

from atrium.billing.quota import Metric
from atrium.models import ApiKey, AuthSession, Document, Invitation, User
from atrium.models.billing import UsageCounter
from tests.conftest import drain_background_writes
from tests.support.accounts import eventually, link_token, new_email, wait_mail
from tests.support.factories import DEFAULT_PASSWORD, create_tenant, create_user
from tests.support.quota import serve_http, set_plan, superuser_headers, usage_of
from tests.support.retrieval import (
    World,
    create_collection,
    make_tenant,
    parse_sse,
    upload,
    wait_ready,
)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# Export: no secret of any kind ---------------------------------------------------------------


async def _invitation_token(mailbox: Any, email: str, n: int) -> str:
    """The token of the ``n``-th invitation mail to ``email`` (it travels only in the mail)."""
    mail = await wait_mail(mailbox, email, "invited you", count=n)
    return link_token(mail, "/invitations/accept")


async def test_export_of_a_tenant_with_keys_and_invitations_holds_no_secret(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    """Every secret and every stored digest a tenant has, looked for in the export's bytes."""
    owner = await create_user(app)
    r = await client.post(
        "/v1/auth/login", data={"username": owner.email, "password": DEFAULT_PASSWORD}
    )
    assert r.status_code == 200, r.text
    session_tokens = r.json()
    headers = _auth(session_tokens["access_token"])
    r = await client.post("/v1/tenants", json={"name": "Keys and invitations"}, headers=headers)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    keys_url = f"/v1/tenants/{tid}/api-keys"

    # A live key, a key rotated with a grace period (old and new secret both work), a revoked key.
    secrets: list[str] = []
    key_ids: list[str] = []
    for name in ("live", "rotated", "revoked"):
        r = await client.post(keys_url, json={"name": name, "scopes": ["search"]}, headers=headers)
        assert r.status_code == 201, r.text
        secrets.append(r.json()["key"])
        key_ids.append(r.json()["id"])
    r = await client.post(
        f"{keys_url}/{key_ids[1]}/rotate", json={"grace_period_seconds": 3600}, headers=headers
    )
    assert r.status_code == 201, r.text
    secrets.append(r.json()["key"])
    key_ids.append(r.json()["id"])
    assert (await client.delete(f"{keys_url}/{key_ids[2]}", headers=headers)).status_code == 204

    # An invitation, sent and sent again: two tokens (the first replaced by the second).
    invitee = new_email("invitee")
    r = await client.post(
        f"/v1/tenants/{tid}/invitations", json={"email": invitee}, headers=headers
    )
    assert r.status_code == 201, r.text
    inv_url = f"/v1/tenants/{tid}/invitations/{r.json()['id']}"
    invitation_tokens = [await _invitation_token(mailbox, invitee, 1)]
    assert (await client.post(f"{inv_url}/resend", headers=headers)).status_code == 200
    invitation_tokens.append(await _invitation_token(mailbox, invitee, 2))
    assert invitation_tokens[0] != invitation_tokens[1]

    r = await client.post("/v1/users/me/export", headers=headers)
    assert r.status_code == 202, r.text
    status_url = f"/v1/users/me/exports/{r.json()['id']}"

    async def ready() -> bool:
        r = await client.get(status_url, headers=headers)
        assert r.json()["status"] != "failed", r.text
        return bool(r.json()["status"] == "ready")

    await eventually(ready, what="the export")
    link = (await client.get(status_url, headers=headers)).json()["download_url"]
    r = await client.get(link.removeprefix("http://testserver"))
    assert r.status_code == 200
    raw = r.content
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}

    # What the database holds in place of the secrets, read back for the search.
    async with app.state.sessionmaker() as s:
        key_hashes = list(
            (await s.execute(select(ApiKey.key_hash).where(ApiKey.tenant_id == uuid.UUID(tid))))
            .scalars()
            .all()
        )
        token_hashes = list(
            (
                await s.execute(
                    select(Invitation.token_hash).where(Invitation.tenant_id == uuid.UUID(tid))
                )
            )
            .scalars()
            .all()
        )
        password_hash = (
            await s.execute(select(User.hashed_password).where(User.email == owner.email))
        ).scalar_one()
        refresh_jtis = list(
            (
                await s.execute(
                    select(AuthSession.refresh_jti).where(AuthSession.user_id == owner.id)
                )
            )
            .scalars()
            .all()
        )
    assert len(key_hashes) == 4 and len(token_hashes) == 1 and refresh_jtis, (
        key_hashes,
        token_hashes,
        refresh_jtis,
    )
    needles = {
        *secrets,
        # The random part alone: lists show "atr_" + 8 characters and the last four, no more.
        *(s[4:-6] for s in secrets),
        *key_hashes,
        *(h.upper() for h in key_hashes),
        *invitation_tokens,
        *token_hashes,
        *(h.upper() for h in token_hashes),
        password_hash,
        password_hash.split("$")[-1],  # the argon2 digest without its parameters
        *refresh_jtis,
        session_tokens["access_token"],
        session_tokens["refresh_token"],
    }
    blobs = {"the ZIP file": raw, **members}
    for needle in needles:
        for name, data in blobs.items():
            assert needle.encode() not in data, f"a secret or digest is in {name}"
    for field in (b"key_hash", b"token_hash", b"hashed_password", b"refresh_jti"):
        assert not any(field in data for data in blobs.values()), field

    # Not vacuous: the keys themselves were exported (all four, the rotated pair linked).
    exported = json.loads(members[f"tenants/{tid}/api_keys.json"])
    assert sorted(k["id"] for k in exported) == sorted(key_ids)
    rotated = next(k for k in exported if k["id"] == key_ids[3])
    assert rotated["rotated_from_id"] == key_ids[1]
    assert {k["prefix"] for k in exported} == {s[:12] for s in secrets}


# Expired access tokens -------------------------------------------------------------------------


async def test_an_expired_access_token_gets_401_on_user_and_tenant_routes(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    from atrium.auth import tokens

    user = await create_user(app)
    tenant = await create_tenant(app, user)
    issued = await tokens.create_access_token(user.id, uuid.uuid4().hex)
    # The app's own secret and algorithm: the same claims signed again, with exp moved.
    secret = settings.secret_key.get_secret_value()
    claims = jwt.decode(issued, secret, algorithms=["HS256"])
    now = int(time.time())

    def signed(**changes: int) -> str:
        return jwt.encode({**claims, **changes}, secret, algorithm="HS256")

    still_valid = signed()
    # Ten minutes past: far beyond the verifier's 5 s leeway, whatever the clock does meanwhile.
    expired = signed(
        iat=now - 3600,
        exp=now - 600,
        **({"nbf": now - 3600} if "nbf" in claims else {}),
    )
    for path in ("/v1/users/me", f"/v1/tenants/{tenant.id}/collections"):
        # The control: the re-signed token is accepted, so only exp can explain the 401.
        ok = await client.get(path, headers=_auth(still_valid))
        assert ok.status_code == 200, (path, ok.text)
        r = await client.get(path, headers=_auth(expired))
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == "Unauthorized"
        assert "expired" in r.json()["detail"], r.text


# No shared cache between tenants ---------------------------------------------------------------

QUERY = "What did the lighthouse keepers do every day?"
TEXTS = {
    "alpha": "Lighthouse keepers on the Alpha coast trimmed the lamp wicks every evening and "
    "logged each passing ship in the Alpha harbour book.",
    "bravo": "Lighthouse keepers on the Bravo islands polished the great lens every morning "
    "and wrote the weather into the Bravo station diary.",
}


async def _tenant_with(app: Any, client: httpx.AsyncClient, word: str) -> tuple[World, str]:
    world = await make_tenant(app, client)
    await create_collection(client, world, "docs")
    doc_id = await upload(client, world, "docs", f"Keepers {word}", TEXTS[word], {})
    await wait_ready(client, world, "docs", doc_id)
    return world, str(doc_id)


async def test_the_same_query_in_two_tenants_never_shares_a_cached_result(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    a, a_doc = await _tenant_with(app, client, "alpha")
    b, b_doc = await _tenant_with(app, client, "bravo")

    async def post(world: World, path: str, **body: Any) -> dict[str, Any]:
        r = await client.post(
            world.url(path), json={"query": QUERY, **body}, headers=world.headers, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    # Tenant A first, until its result is served from the cache.
    assert (await post(a, "search"))["cache_hit"] is False
    warm = await post(a, "search")
    assert warm["cache_hit"] is True
    assert {x["document_id"] for x in warm["results"]} == {a_doc}

    theirs = await post(b, "search")
    assert theirs["cache_hit"] is False
    assert {x["document_id"] for x in theirs["results"]} == {b_doc}
    assert all("Alpha" not in x["text"] for x in theirs["results"])

    # The same for answers (their retrieval goes through the same cache).
    await post(a, "answer")
    warm_answer = await post(a, "answer")
    assert warm_answer["cache_hit"] is True
    assert {s["document_id"] for s in warm_answer["sources"]} == {a_doc}
    answer = await post(b, "answer")
    assert answer["cache_hit"] is False
    assert {s["document_id"] for s in answer["sources"]} == {b_doc}
    assert "Bravo" in answer["answer"] and "Alpha" not in answer["answer"]

    # And streamed: the sources sent before the text are B's own.
    r = await client.post(
        b.url("answer"), json={"query": QUERY, "stream": True}, headers=b.headers, timeout=60
    )
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    retrieval = next(e.data for e in events if e.event == "retrieval")
    assert {s["document_id"] for s in retrieval["sources"]} == {b_doc}
    done = next(e.data for e in events if e.event == "done")
    assert "Alpha" not in done["answer"]


# Exact limits under concurrency on the real routes ---------------------------------------------


async def _db_used(app: Any, tenant_id: uuid.UUID, metric: Metric) -> int:
    # Settlements are written in batches: finish them, then read what MySQL holds.
    await drain_background_writes(app)
    async with app.state.sessionmaker() as s:
        used = await s.scalar(
            select(func.coalesce(func.sum(UsageCounter.used), 0)).where(
                UsageCounter.tenant_id == tenant_id, UsageCounter.metric == metric.value
            )
        )
    return int(used or 0)


async def _limited(app: Any, client: httpx.AsyncClient, **limits: int) -> World:
    world = await make_tenant(app, client)
    await create_collection(client, world, "docs")
    # The per-user request rate off: these tests are about plan quotas, not request rates.
    await set_plan(
        client,
        await superuser_headers(app),
        world.tenant_id,
        "free",
        {"requests_per_minute_per_user": None, **limits},
    )
    return world


async def test_parallel_searches_on_the_real_route_admit_exactly_the_quota(
    app: Any, client: httpx.AsyncClient
) -> None:
    n, k = 24, 5
    world = await _limited(app, client, searches_per_month=k)
    async with (
        serve_http(app) as base_url,
        httpx.AsyncClient(
            base_url=base_url,
            timeout=120,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        ) as http,
    ):
        responses = await asyncio.gather(
            *[
                http.post(
                    world.url("search"), json={"query": f"question {i}"}, headers=world.headers
                )
                for i in range(n)
            ]
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * k + [402] * (n - k), statuses
    for r in responses:
        if r.status_code == 402:
            assert r.json()["detail"]["metric"] == "searches", r.text
            assert r.json()["detail"]["limit"] == k
    r = await client.get(world.url("usage"), headers=world.headers)
    searches = usage_of(r.json(), "searches")
    assert (searches["used"], searches["reserved"]) == (k, 0)
    assert await _db_used(app, world.tenant_id, Metric.searches) == k


async def test_parallel_uploads_on_the_real_route_admit_exactly_the_document_limit(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    n, k = 12, 3
    world = await _limited(app, client, documents=k)
    url = world.url(f"collections/{world.collections['docs']}/documents")
    files = [
        (f"note-{i}.txt", f"Note {i}: the keeper wrote down the tide at {i} o'clock.".encode())
        for i in range(n)
    ]
    async with (
        serve_http(app) as base_url,
        httpx.AsyncClient(
            base_url=base_url,
            timeout=120,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        ) as http,
    ):
        responses = await asyncio.gather(
            *[
                http.post(url, files=[("files", (name, data, "text/plain"))], headers=world.headers)
                for name, data in files
            ]
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [202] * k + [402] * (n - k), [(r.status_code, r.text) for r in responses]
    for r in responses:
        if r.status_code == 402:
            assert r.json()["detail"]["metric"] == "documents", r.text
    accepted = [r.json()["documents"][0] for r in responses if r.status_code == 202]
    r = await client.get(world.url("usage"), headers=world.headers)
    usage = r.json()
    assert (usage_of(usage, "documents")["used"], usage_of(usage, "documents")["reserved"]) == (
        k,
        0,
    )
    assert usage_of(usage, "stored_bytes")["used"] == sum(d["size_bytes"] for d in accepted)
    assert await _db_used(app, world.tenant_id, Metric.documents) == k
    async with app.state.sessionmaker() as s:
        rows = await s.scalar(
            select(func.count()).select_from(Document).where(Document.tenant_id == world.tenant_id)
        )
    assert rows == k
    # The accepted ones are real documents: the worker makes each one ready.
    for d in accepted:
        await wait_ready(client, world, "docs", uuid.UUID(d["id"]))
