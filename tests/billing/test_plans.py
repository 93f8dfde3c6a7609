"""Plans: the public list, the plans file's validation, plan changes and overrides by a
superuser (audited, effective at once)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from atrium.billing.plans import Limit, PlanConfigError, load_plans
from atrium.models import AuditEvent
from tests.support.factories import bearer, create_user
from tests.support.quota import set_plan, superuser_headers, tenant_with_owner, usage_of


async def test_plans_are_public(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/plans")
    assert r.status_code == 200
    body = r.json()
    assert body["default_plan"] == "free"
    plans = {p["name"]: p for p in body["plans"]}
    assert {"free", "pro", "enterprise"} <= set(plans)
    for plan in plans.values():
        assert set(plan["limits"]) == {limit.value for limit in Limit}
    free, pro = plans["free"]["limits"], plans["pro"]["limits"]
    assert free["searches_per_month"] < pro["searches_per_month"]
    assert plans["enterprise"]["limits"]["searches_per_month"] is None  # unlimited
    # An anonymous route: limited per IP.
    assert r.headers["X-RateLimit-Limit"] == "120"


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "plans.toml"
    path.write_text(body)
    return path


_FULL = "\n".join(f"{limit.value} = 1" for limit in Limit)
_BASE = 'default_plan = "a"\n[plans.a]\n' + _FULL


def test_bundled_plans_file_is_valid() -> None:
    catalog = load_plans()
    assert catalog.default_plan == "free"
    assert catalog.get("no-such-plan").name == "free"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_BASE.replace("chunks = 1\n", ""), "missing limit chunks"),
        (_BASE.replace("chunks = 1", "chunks = -1"), "chunks must be a non-negative integer"),
        (_BASE.replace("chunks = 1", 'chunks = "lots"'), "chunks must be a non-negative integer"),
        (_BASE + "\nseats = 3", "unknown keys ['seats']"),
        ('default_plan = "b"\n[plans.a]\n' + _FULL, "default_plan 'b' is not defined"),
        ("title = 1", "no [plans.<name>] tables"),
    ],
)
def test_invalid_plans_files_are_refused_with_a_reason(
    tmp_path: Path, body: str, message: str
) -> None:
    with pytest.raises(PlanConfigError, match=re.escape(message)):
        load_plans(_write(tmp_path, body))


async def test_only_superusers_change_plans(app: Any, client: httpx.AsyncClient) -> None:
    tenant, _, owner_headers = await tenant_with_owner(app)
    body = {"plan": "pro"}
    url = f"/v1/admin/tenants/{tenant.id}/plan"
    assert (await client.put(url, json=body)).status_code == 401
    # Even the tenant's owner cannot pick its own plan.
    r = await client.put(url, json=body, headers=owner_headers)
    assert r.status_code == 403
    assert (await client.get(url, headers=owner_headers)).status_code == 403


async def test_superuser_changes_plan_and_overrides(app: Any, client: httpx.AsyncClient) -> None:
    tenant, _, owner_headers = await tenant_with_owner(app)
    superuser = await create_user(app, superuser=True)
    admin = await bearer(superuser)
    usage_url = f"/v1/tenants/{tenant.id}/usage"

    # Cache the free plan's figures first: the change must be visible at once anyway.
    before = (await client.get(usage_url, headers=owner_headers)).json()
    assert before["plan"] == "free"
    assert usage_of(before, "searches")["limit"] == 1000

    body = await set_plan(
        client,
        admin,
        tenant.id,
        "pro",
        {"searches_per_month": 5, "answers_per_month": None, "requests_per_minute_per_key": 7},
    )
    assert body["plan"] == "pro"
    assert body["overrides"] == {
        "searches_per_month": 5,
        "answers_per_month": None,
        "requests_per_minute_per_key": 7,
    }
    assert body["limits"]["searches_per_month"] == 5
    assert body["limits"]["answers_per_month"] is None
    assert body["limits"]["documents"] == 10_000  # the pro plan's
    assert body["period_start"] < body["period_end"]

    after = (await client.get(usage_url, headers=owner_headers)).json()
    assert after["plan"] == "pro"
    assert usage_of(after, "searches")["limit"] == 5
    assert usage_of(after, "answers")["limit"] is None
    assert usage_of(after, "answers")["percent"] is None
    assert after["requests_per_minute_per_key"] == 7

    # Overrides omitted: kept. Empty: cleared.
    body = await set_plan(client, admin, tenant.id, "enterprise")
    assert body["overrides"]["searches_per_month"] == 5
    body = await set_plan(client, admin, tenant.id, "enterprise", {})
    assert body["overrides"] == {}
    assert body["limits"]["searches_per_month"] is None
    got = await client.get(f"/v1/admin/tenants/{tenant.id}/plan", headers=admin)
    assert got.json() == body

    async with app.state.sessionmaker() as s:
        events = (
            (
                await s.execute(
                    select(AuditEvent)
                    .where(
                        AuditEvent.tenant_id == tenant.id,
                        AuditEvent.action == "billing.plan_changed",
                    )
                    .order_by(AuditEvent.created_at)
                )
            )
            .scalars()
            .all()
        )
    assert len(events) == 3
    # Timestamps have second precision: find the first change by what it changed.
    first = next(e for e in events if e.data["before"]["plan"] == "free")
    assert first.actor_user_id == superuser.id
    assert first.data["before"] == {"plan": "free", "overrides": {}}
    assert first.data["after"]["plan"] == "pro"
    assert first.data["after"]["overrides"]["searches_per_month"] == 5


async def test_plan_change_errors_are_actionable(app: Any, client: httpx.AsyncClient) -> None:
    tenant, _, _ = await tenant_with_owner(app)
    admin = await superuser_headers(app)
    url = f"/v1/admin/tenants/{tenant.id}/plan"

    r = await client.put(url, json={"plan": "platinum"}, headers=admin)
    assert r.status_code == 422
    assert "Unknown plan 'platinum'" in r.json()["detail"]["message"]
    assert r.json()["detail"]["plans"] == ["enterprise", "free", "pro"]

    r = await client.put(url, json={"plan": "pro", "overrides": {"seats": 3}}, headers=admin)
    assert r.status_code == 422
    r = await client.put(url, json={"plan": "pro", "overrides": {"documents": -1}}, headers=admin)
    assert r.status_code == 422

    r = await client.put(
        f"/v1/admin/tenants/{uuid.uuid4()}/plan", json={"plan": "pro"}, headers=admin
    )
    assert r.status_code == 404


def test_a_plan_cannot_make_uploads_unlimited(tmp_path: Any) -> None:
    from atrium.billing.plans import BUNDLED_PLANS_FILE, PlanConfigError, load_plans

    text = BUNDLED_PLANS_FILE.read_text().replace(
        "max_upload_bytes = 209_715_200", 'max_upload_bytes = "unlimited"'
    )
    path = tmp_path / "plans.toml"
    path.write_text(text)
    with pytest.raises(PlanConfigError, match="max_upload_bytes must be a number"):
        load_plans(path)
