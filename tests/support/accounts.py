"""Helpers for the account, tenant and invitation tests.

They drive the API the way a person does: mail is read from the test SMTP server and the link in
it is followed, i.e. its token goes to the API route the web page behind the link calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import psycopg

from tests.support.smtp import Mailbox, ReceivedMail

PASSWORD = "a sturdy passphrase 4 tests"


def new_email(prefix: str = "user") -> str:
    """A fresh address."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


async def wait_mail(
    mailbox: Mailbox, to: str, subject: str, count: int = 1, timeout: float = 60.0
) -> ReceivedMail:
    """The ``count``-th mail to ``to`` whose subject contains ``subject``."""
    return await asyncio.to_thread(mailbox.wait_for, to, subject, timeout, count)


def link_token(mail: ReceivedMail, path: str) -> str:
    """The token of the first link to ``path`` in a mail (what the web page would post)."""
    for link in mail.links():
        parsed = urlparse(link)
        if parsed.path == path:
            assert parsed.scheme == "http" and parsed.netloc == "testserver", link
            return parse_qs(parsed.query)["token"][0]
    raise AssertionError(f"no link to {path} in {mail.links()}")


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


async def register(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **extra: Any
) -> httpx.Response:
    """POST /v1/auth/register."""
    return await client.post(
        "/v1/auth/register", json={"email": email, "password": password, **extra}
    )


async def verify_from_mail(client: httpx.AsyncClient, mailbox: Mailbox, email: str) -> None:
    """Follow the link of the verification mail."""
    mail = await wait_mail(mailbox, email, "Verify your e-mail")
    r = await client.post("/v1/auth/verify", json={"token": link_token(mail, "/verify-email")})
    assert r.status_code == 200, r.text
    assert r.json()["is_verified"] is True


async def login(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **headers: str
) -> httpx.Response:
    """POST /v1/auth/login with the OAuth2 password form."""
    return await client.post(
        "/v1/auth/login", data={"username": email, "password": password}, headers=headers
    )


async def signup(
    client: httpx.AsyncClient, mailbox: Mailbox, email: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Register, verify from the mail, log in: ``{email, user, tenant, tokens, headers}``."""
    email = email or new_email()
    r = await register(client, email, **extra)
    assert r.status_code == 201, r.text
    await verify_from_mail(client, mailbox, email)
    r = await login(client, email)
    assert r.status_code == 200, r.text
    tokens = r.json()
    headers = bearer(tokens["access_token"])
    user = (await client.get("/v1/users/me", headers=headers)).json()
    tenants = (await client.get("/v1/tenants", headers=headers)).json()["items"]
    return {
        "email": email,
        "user": user,
        "tenant": tenants[0] if tenants else None,
        "tokens": tokens,
        "headers": headers,
    }


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds (background jobs run in the real worker)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def partition_exists(settings: Any, tenant_id: uuid.UUID | str) -> bool:
    """Whether the tenant's pgvector partition exists."""
    from atrium.kit.vectordb import partition_name

    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        cur = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (partition_name(uuid.UUID(str(tenant_id))),)
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def tenant_row_count(app: Any, tenant_id: uuid.UUID | str) -> int:
    """Rows mentioning the tenant in every account table that has a ``tenant_id`` (and tenants)."""
    from sqlalchemy import func, select

    from atrium.models import Base

    tid = uuid.UUID(str(tenant_id))
    total = 0
    async with app.state.sessionmaker() as session:
        for table in Base.metadata.tables.values():
            if table.name == "tenants":
                col = table.c.id
            elif "tenant_id" in table.c:
                col = table.c.tenant_id
            else:
                continue
            n = await session.scalar(select(func.count()).select_from(table).where(col == tid))
            total += int(n or 0)
    return total
