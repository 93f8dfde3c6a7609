"""Members are a plan limit: a seat is held when an invitation is accepted (402 when the plan
is full) and given back when a member leaves or is removed."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.support.accounts import link_token
from tests.support.factories import bearer, create_tenant, create_user
from tests.support.quota import set_plan, superuser_headers, usage_of


async def _invite(
    client: httpx.AsyncClient, mailbox: Any, tenant: Any, headers: dict[str, str], email: str
) -> str:
    r = await client.post(
        f"/v1/tenants/{tenant.id}/invitations", json={"email": email}, headers=headers
    )
    assert r.status_code == 201, r.text
    mail = await asyncio.to_thread(mailbox.wait_for, email, "invited you")
    return link_token(mail, "/invitations/accept")


async def test_seats_are_held_on_accept_and_freed_on_removal(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    owner_h = await bearer(owner)
    await set_plan(client, await superuser_headers(app), tenant.id, "free", {"members": 2})
    ann, bob = await create_user(app), await create_user(app)
    ann_token = await _invite(client, mailbox, tenant, owner_h, ann.email)
    bob_token = await _invite(client, mailbox, tenant, owner_h, bob.email)

    r = await client.post(
        "/v1/invitations/accept", json={"token": ann_token}, headers=await bearer(ann)
    )
    assert r.status_code == 200, r.text
    full = await client.post(
        "/v1/invitations/accept", json={"token": bob_token}, headers=await bearer(bob)
    )
    assert full.status_code == 402
    assert full.json()["error"] == "QuotaExceeded"
    assert {k: full.json()["detail"][k] for k in ("metric", "limit", "used", "resets_at")} == {
        "metric": "members",
        "limit": 2,
        "used": 2,
        "resets_at": None,
    }
    usage = (await client.get(f"/v1/tenants/{tenant.id}/usage", headers=owner_h)).json()
    assert usage_of(usage, "members")["used"] == 2

    r = await client.delete(f"/v1/tenants/{tenant.id}/members/{ann.id}", headers=owner_h)
    assert r.status_code == 204, r.text
    # The refused invitation was not spent: it works now that a seat is free.
    r = await client.post(
        "/v1/invitations/accept", json={"token": bob_token}, headers=await bearer(bob)
    )
    assert r.status_code == 200, r.text
    usage = (await client.get(f"/v1/tenants/{tenant.id}/usage", headers=owner_h)).json()
    assert usage_of(usage, "members")["used"] == 2
