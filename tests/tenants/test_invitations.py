"""Invitations: create, list, withdraw, resend, accept (existing and new users), every refusal."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import httpx
from sqlalchemy import update

from atrium.models import Invitation, Role, TenantStatus
from tests.support.accounts import PASSWORD, link_token, login, new_email, wait_mail
from tests.support.factories import DEFAULT_PASSWORD, add_member, bearer, create_tenant, create_user


async def _setup(app: Any) -> dict[str, Any]:
    owner = await create_user(app, name="Olga")
    tenant = await create_tenant(app, owner, name="Invite Co")
    return {
        "owner": owner,
        "tenant": tenant,
        "h": await bearer(owner),
        "url": f"/v1/tenants/{tenant.id}/invitations",
    }


async def _invite(
    client: httpx.AsyncClient, s: dict[str, Any], email: str, role: str = "member"
) -> dict[str, Any]:
    r = await client.post(s["url"], json={"email": email, "role": role}, headers=s["h"])
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_invite_refusals(app: Any, client: httpx.AsyncClient, celery_worker: Any) -> None:
    s = await _setup(app)
    for bad in (
        {"email": "nope"},
        {"email": new_email(), "role": "owner"},
        {"email": new_email(), "role": "king"},
        {},
    ):
        assert (await client.post(s["url"], json=bad, headers=s["h"])).status_code == 422
    member = await create_user(app)
    await add_member(app, s["tenant"], member, Role.viewer)
    r = await client.post(s["url"], json={"email": member.email.upper()}, headers=s["h"])
    assert r.status_code == 409 and "already a member" in r.json()["detail"]
    email = new_email()
    inv = await _invite(client, s, email)
    r = await client.post(s["url"], json={"email": email}, headers=s["h"])
    assert r.status_code == 409 and r.json()["detail"]["id"] == inv["id"]
    viewer_h = await bearer(member)
    r = await client.post(s["url"], json={"email": new_email()}, headers=viewer_h)
    assert r.status_code == 403 and r.json()["detail"]["missing_permission"] == "members:manage"


async def test_existing_user_accepts_and_the_link_is_single_use(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    s = await _setup(app)
    guest = await create_user(app)
    inv = await _invite(client, s, guest.email, role="admin")
    assert inv["status"] == "pending" and inv["role"] == "admin"
    mail = await wait_mail(mailbox, guest.email, "invited you to Invite Co")
    assert "Olga" in mail.subject and "7 days" in mail.text
    token = link_token(mail, "/invitations/accept")

    # Someone else, signed in, cannot use it.
    intruder = await create_user(app)
    r = await client.post(
        "/v1/invitations/accept", json={"token": token}, headers=await bearer(intruder)
    )
    assert r.status_code == 403 and "another e-mail address" in r.json()["detail"]

    r = await client.post(
        "/v1/invitations/accept", json={"token": token}, headers=await bearer(guest)
    )
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["id"] == str(s["tenant"].id) and r.json()["tenant"]["role"] == "admin"
    r = await client.post(
        "/v1/invitations/accept", json={"token": token}, headers=await bearer(guest)
    )
    assert r.status_code == 410
    listed = (await client.get(s["url"], headers=s["h"])).json()
    assert [i["status"] for i in listed["items"]] == ["accepted"]
    # Accepted invitations cannot be withdrawn or resent.
    assert (await client.delete(f"{s['url']}/{inv['id']}", headers=s["h"])).status_code == 409
    assert (await client.post(f"{s['url']}/{inv['id']}/resend", headers=s["h"])).status_code == 409


async def test_new_user_accepts_by_creating_an_account(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    s = await _setup(app)
    email = new_email("newbie")
    await _invite(client, s, email, role="viewer")
    token = link_token(await wait_mail(mailbox, email, "invited you"), "/invitations/accept")

    r = await client.post("/v1/invitations/accept", json={"token": token})
    assert r.status_code == 401 and "send a password" in r.json()["detail"]
    r = await client.post("/v1/invitations/accept", json={"token": token, "password": "short"})
    assert r.status_code == 422 and r.json()["detail"]["rule"] == "min_length"
    r = await client.post("/v1/invitations/accept", json={"token": "t" * 5})
    assert r.status_code == 422
    r = await client.post(
        "/v1/invitations/accept", json={"token": token, "password": PASSWORD, "name": "Newbie"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["tenant"]["role"] == "viewer"
    tokens = (await login(client, email)).json()
    me = (await client.get("/v1/users/me", headers=bearer_h(tokens))).json()
    assert me["name"] == "Newbie" and me["is_verified"] is True
    tenants = (await client.get("/v1/tenants", headers=bearer_h(tokens))).json()["items"]
    assert [t["name"] for t in tenants] == ["Invite Co"]  # no tenant of their own


async def test_registering_through_an_invitation_needs_the_invited_address(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    s = await _setup(app)
    email = new_email()
    await _invite(client, s, email)
    token = link_token(await wait_mail(mailbox, email, "invited you"), "/invitations/accept")
    r = await client.post(
        "/v1/auth/register",
        json={"email": new_email(), "password": PASSWORD, "invitation_token": token},
    )
    assert r.status_code == 403
    # An invited address that already has an account must log in to accept.
    existing = await create_user(app)
    await _invite(client, s, existing.email)
    token2 = link_token(
        await wait_mail(mailbox, existing.email, "invited you"), "/invitations/accept"
    )
    r = await client.post(
        "/v1/invitations/accept", json={"token": token2, "password": DEFAULT_PASSWORD + "x"}
    )
    assert r.status_code == 409 and "log in" in r.json()["detail"]


async def test_withdraw_resend_expiry_and_listing(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    s = await _setup(app)
    gone, again, late = new_email("gone"), new_email("again"), new_email("late")
    inv_gone = await _invite(client, s, gone)
    inv_again = await _invite(client, s, again)
    inv_late = await _invite(client, s, late)

    # Withdrawn: the link stops working.
    t_gone = link_token(await wait_mail(mailbox, gone, "invited you"), "/invitations/accept")
    assert (await client.delete(f"{s['url']}/{inv_gone['id']}", headers=s["h"])).status_code == 204
    assert (await client.delete(f"{s['url']}/{inv_gone['id']}", headers=s["h"])).status_code == 404
    r = await client.post("/v1/invitations/accept", json={"token": t_gone, "password": PASSWORD})
    assert r.status_code == 404

    # Resent: a new link; the old one stops working.
    t_old = link_token(await wait_mail(mailbox, again, "invited you"), "/invitations/accept")
    r = await client.post(f"{s['url']}/{inv_again['id']}/resend", headers=s["h"])
    assert r.status_code == 200 and r.json()["status"] == "pending"
    t_new = link_token(
        await wait_mail(mailbox, again, "invited you", count=2), "/invitations/accept"
    )
    assert t_new != t_old
    r = await client.post("/v1/invitations/accept", json={"token": t_old, "password": PASSWORD})
    assert r.status_code == 404
    r = await client.post("/v1/invitations/accept", json={"token": t_new, "password": PASSWORD})
    assert r.status_code == 200

    # Expired: 410, and listed as expired.
    t_late = link_token(await wait_mail(mailbox, late, "invited you"), "/invitations/accept")
    async with app.state.sessionmaker() as session:
        await session.execute(
            update(Invitation)
            .where(Invitation.id == uuid.UUID(inv_late["id"]))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        await session.commit()
    r = await client.post("/v1/invitations/accept", json={"token": t_late, "password": PASSWORD})
    assert r.status_code == 410 and "expired" in r.json()["detail"]
    listed = (await client.get(s["url"], headers=s["h"])).json()
    assert {i["email"]: i["status"] for i in listed["items"]} == {
        again: "accepted",
        late: "expired",
    }
    # Resending an expired invitation revives it.
    r = await client.post(f"{s['url']}/{inv_late['id']}/resend", headers=s["h"])
    assert r.status_code == 200 and r.json()["status"] == "pending"

    # Unknown or foreign ids are 404.
    other = await create_tenant(app, s["owner"])
    r = await client.delete(f"/v1/tenants/{other.id}/invitations/{inv_late['id']}", headers=s["h"])
    assert r.status_code == 404
    r = await client.post(f"{s['url']}/{uuid.uuid4()}/resend", headers=s["h"])
    assert r.status_code == 404


async def test_invitation_to_a_suspended_tenant_is_refused(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    s = await _setup(app)
    email = new_email()
    await _invite(client, s, email)
    token = link_token(await wait_mail(mailbox, email, "invited you"), "/invitations/accept")
    from atrium.models import Tenant

    async with app.state.sessionmaker() as session:
        await session.execute(
            update(Tenant).where(Tenant.id == s["tenant"].id).values(status=TenantStatus.suspended)
        )
        await session.commit()
    r = await client.post("/v1/invitations/accept", json={"token": token, "password": PASSWORD})
    assert r.status_code == 403 and "suspended" in r.json()["detail"]


def bearer_h(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


# Abuse as a mail relay ---------------------------------------------------------------------


async def test_resending_one_invitation_is_limited(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    """Resend mails an address of the inviter's choosing: at most 3 mails an hour each."""
    s = await _setup(app)
    inv = await _invite(client, s, new_email())
    url = f"{s['url']}/{inv['id']}/resend"
    codes = [(await client.post(url, headers=s["h"])).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # the creation was the first of the three mails
    r = await client.post(url, headers=s["h"])
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) > 0
    assert r.json()["error"] == "TooManyRequests"


async def test_one_address_gets_a_bounded_number_of_invitations(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    """Many tenants (anyone can make some) together cannot flood one address."""
    target = new_email()
    codes = []
    for _ in range(6):
        s = await _setup(app)
        r = await client.post(s["url"], json={"email": target}, headers=s["h"])
        codes.append(r.status_code)
    assert codes == [201] * 5 + [429]


async def test_invitation_mail_bounds_and_defangs_the_names_it_quotes(
    app: Any, client: httpx.AsyncClient, mailbox: Any, celery_worker: Any
) -> None:
    """Tenant and inviter names are the inviter's text in someone else's inbox."""
    owner = await create_user(app, name="Win a prize at https://evil.example/claim\r\nBcc: x@y")
    tenant = await create_tenant(app, owner, name="Cheap pills " * 15)
    email = new_email()
    r = await client.post(
        f"/v1/tenants/{tenant.id}/invitations",
        json={"email": email},
        headers=await bearer(owner),
    )
    assert r.status_code == 201, r.text
    mail = await wait_mail(mailbox, email, "invited you")
    assert "\n" not in mail.subject and "\r" not in mail.subject
    assert "https://" not in mail.subject and "evil.example" not in mail.subject
    assert len(mail.subject) < 160
    assert "Bcc" not in mail.message
    # The only link in the mail is Atrium's own.
    assert [link.split("?")[0] for link in mail.links()] == ["http://testserver/invitations/accept"]
