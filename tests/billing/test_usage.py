"""Usage: the figures and daily history a tenant sees, who may see them, and the warning mails
at 80% and 100% (received by the test SMTP server, once per metric and period)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from atrium.billing.quota import Metric, alerts_key
from atrium.models import Role
from tests.conftest import drain_background_writes
from tests.support.factories import add_member, bearer, create_tenant, create_user
from tests.support.quota import (
    build_quota_app,
    set_plan,
    superuser_headers,
    tenant_with_owner,
    usage_of,
)


@pytest.fixture(scope="module")
async def quota_app(test_env: dict[str, Any]) -> AsyncIterator[Any]:
    app = build_quota_app()
    async with LifespanManager(app, startup_timeout=60):
        yield app


@pytest.fixture
async def qclient(quota_app: Any, clean_state: None) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=quota_app, client=("127.0.0.1", 50002))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def _api_key(app: Any, tenant_id: uuid.UUID, scopes: list[str]) -> dict[str, str]:
    from atrium.apikeys.service import issue_key

    async with app.state.sessionmaker() as s:
        _, secret = await issue_key(s, app.state.settings, tenant_id, name="k", scopes=scopes)
        await s.commit()
    return {"Authorization": f"Bearer {secret}"}


async def test_usage_lists_every_metric(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    tenant, _, headers = await tenant_with_owner(quota_app)
    for _ in range(3):
        r = await qclient.post(f"/v1/tenants/{tenant.id}/_quota_test/search", headers=headers)
        assert r.status_code == 200
    r = await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert body["plan"] == "free"
    assert [m["metric"] for m in body["metrics"]] == [m.value for m in Metric]
    period_end = dt.datetime.fromisoformat(body["period_end"])
    assert dt.datetime.fromisoformat(body["period_start"]) <= dt.datetime.now(dt.UTC) < period_end
    searches = usage_of(body, "searches")
    assert searches == {
        "metric": "searches",
        "kind": "monthly",
        "used": 3,
        "reserved": 0,
        "limit": 1000,
        "percent": 0.3,
        "resets_at": searches["resets_at"],
    }
    assert dt.datetime.fromisoformat(searches["resets_at"]) == period_end
    members = usage_of(body, "members")
    # The owner counts as a member from the start.
    assert (members["kind"], members["used"], members["limit"]) == ("level", 1, 3)
    assert members["resets_at"] is None
    assert body["requests_per_minute_per_user"] == 120
    assert body["max_upload_bytes"] == 10 * 1024 * 1024


async def test_who_may_read_usage(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    tenant, _, _ = await tenant_with_owner(quota_app)
    viewer = await create_user(quota_app)
    await add_member(quota_app, tenant, viewer, Role.viewer)
    url = f"/v1/tenants/{tenant.id}/usage"
    assert (await qclient.get(url, headers=await bearer(viewer))).status_code == 200
    assert (await qclient.get(url + "/history", headers=await bearer(viewer))).status_code == 200

    # Someone else's tenant does not exist for you.
    stranger = await create_user(quota_app)
    other = await create_tenant(quota_app, stranger)
    r = await qclient.get(f"/v1/tenants/{other.id}/usage", headers=await bearer(viewer))
    assert r.status_code == 404
    assert (await qclient.get(url)).status_code == 401

    # API keys need the usage:read scope.
    with_scope = await _api_key(quota_app, tenant.id, ["usage:read"])
    without = await _api_key(quota_app, tenant.id, ["search"])
    assert (await qclient.get(url, headers=with_scope)).status_code == 200
    r = await qclient.get(url, headers=without)
    assert r.status_code == 403
    assert r.json()["detail"]["missing_permission"] == "usage:read"


async def test_history_has_one_entry_per_day(quota_app: Any, qclient: httpx.AsyncClient) -> None:
    # The day is read before the work and again after the history: if midnight (UTC) fell in
    # between, the work may be split over two days, so it is done again on a fresh tenant (a
    # second midnight cannot come seconds later).
    for _attempt in range(2):
        today = dt.datetime.now(dt.UTC).date()
        tenant, _, headers = await tenant_with_owner(quota_app)
        for _ in range(2):
            r = await qclient.post(f"/v1/tenants/{tenant.id}/_quota_test/search", headers=headers)
            assert r.status_code == 200
        r = await qclient.post(
            f"/v1/tenants/{tenant.id}/_quota_test/documents", params={"size": 300}, headers=headers
        )
        assert r.status_code == 200
        r = await qclient.get(f"/v1/tenants/{tenant.id}/usage/history?days=5", headers=headers)
        assert r.status_code == 200
        days = r.json()["days"]
        if dt.datetime.now(dt.UTC).date() == today:
            break
    assert [d["date"] for d in days] == [
        (today - dt.timedelta(days=n)).isoformat() for n in range(4, -1, -1)
    ]
    assert days[-1]["values"]["searches"] == 2
    assert days[-1]["values"]["documents"] == 1
    assert days[-1]["values"]["stored_bytes"] == 300
    assert all(d["values"]["searches"] == 0 for d in days[:-1])
    assert set(days[0]["values"]) == {m.value for m in Metric}

    default = await qclient.get(f"/v1/tenants/{tenant.id}/usage/history", headers=headers)
    assert len(default.json()["days"]) == 90
    for bad in ("0", "367", "many"):
        r = await qclient.get(f"/v1/tenants/{tenant.id}/usage/history?days={bad}", headers=headers)
        assert r.status_code == 422, bad


async def _drain_worker() -> None:
    """Wait until the worker has run every job sent before now (one solo process, one queue,
    prefetch 1: jobs run in the order they were sent)."""
    from atrium.worker import celery_app

    result = celery_app.send_task("atrium.ping", kwargs={"payload": "drain"})
    await asyncio.to_thread(result.get, timeout=60)


async def test_warning_mails_at_80_and_100_percent_once(
    quota_app: Any, qclient: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    owner = await create_user(quota_app, email=f"owner-{tag}@example.com")
    admin = await create_user(quota_app, email=f"admin-{tag}@example.com")
    member = await create_user(quota_app, email=f"member-{tag}@example.com")
    tenant = await create_tenant(quota_app, owner, name=f"Acme {tag}")
    await add_member(quota_app, tenant, admin, Role.admin)
    await add_member(quota_app, tenant, member, Role.member)
    superuser = await superuser_headers(quota_app)
    await set_plan(qclient, superuser, tenant.id, "free", {"searches_per_month": 10})
    headers = await bearer(member)
    url = f"/v1/tenants/{tenant.id}/_quota_test/search"

    async def search(n: int) -> None:
        for _ in range(n):
            assert (await qclient.post(url, headers=headers)).status_code == 200

    await search(7)
    await search(1)  # 8 of 10: 80%
    for person in (owner, admin):
        mail = await asyncio.to_thread(mailbox.wait_for, person.email, "80%")
        assert f"Acme {tag}" in mail.subject
        assert "searches" in mail.subject
        assert "8 of the 10 searches" in mail.text
        assert f"/v1/tenants/{tenant.id}/usage" in mail.links()[0]
    await search(1)  # 90%: nothing new
    await search(1)  # 100%
    for person in (owner, admin):
        mail = await asyncio.to_thread(mailbox.wait_for, person.email, "100%")
        assert "are refused" in mail.text
    assert (await qclient.post(url, headers=headers)).status_code == 402

    # A Redis flush does not make them send again: the database remembers what was sent.
    await quota_app.state.redis.flushdb()
    await set_plan(qclient, superuser, tenant.id, "free", {"searches_per_month": 11})
    await search(1)
    # A barrier instead of a pause: the search's settlement (and the warning check it runs) is
    # written, the check has run again (it marked the 100% warning handled in the Redis that
    # was flushed), and the worker has run every job sent before a later marker job. Any
    # second mail would be in the mailbox by now.
    await drain_background_writes(quota_app)
    tag = dt.datetime.fromisoformat(
        (await qclient.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)).json()[
            "period_start"
        ]
    ).strftime("%Y%m%dT%H%M%S")
    assert "searches:100" in await quota_app.state.redis.smembers(alerts_key(tenant.id, tag))
    await _drain_worker()
    for person in (owner, admin):
        subjects = [m.subject for m in mailbox.all(person.email)]
        assert len(subjects) == 2, subjects
        assert sum("80%" in s for s in subjects) == 1
        assert sum("100%" in s for s in subjects) == 1
    # Members who are not owners or admins are not mailed.
    assert mailbox.all(member.email) == []
