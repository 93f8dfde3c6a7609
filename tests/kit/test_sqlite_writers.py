"""The embedded SQLite account database with concurrent writers (decision 0008).

A transaction that reads and then writes must wait for the write lock, not fail with
"database is locked" because another connection committed in between; writers of one process
take turns; an error path that writes on its own (a failed login's audit record) does not wait
for the lock its own request holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.kit.db import create_engine, create_sessionmaker, unit_of_work, writing
from tests.support.factories import create_user


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/w.db", busy_timeout=5.0)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)"))
        await conn.execute(text("INSERT INTO t (id, n) VALUES (1, 0)"))
    yield engine
    await engine.dispose()


async def test_read_then_write_waits_for_a_writer_that_committed_meanwhile(
    engine: AsyncEngine,
) -> None:
    maker = create_sessionmaker(engine)
    other_committed = asyncio.Event()

    async def other() -> None:
        # A second connection (as the worker's would be) commits a write while the first
        # transaction is between its read and its write.
        async with maker() as session:
            await session.execute(text("UPDATE t SET n = n + 100 WHERE id = 1"))
            await session.commit()
        other_committed.set()

    async with unit_of_work(maker) as session:
        before = (await session.execute(text("SELECT n FROM t WHERE id = 1"))).scalar_one()
        task = asyncio.create_task(other())
        # With a deferred BEGIN the other writer commits now and the UPDATE below fails at once
        # ("database is locked"); with the lock taken at BEGIN, the other one waits for us.
        await asyncio.sleep(0.3)
        await session.execute(text("UPDATE t SET n = :n WHERE id = 1"), {"n": before + 1})
    await asyncio.wait_for(task, 10)
    assert other_committed.is_set()
    async with maker() as session:
        assert (await session.execute(text("SELECT n FROM t WHERE id = 1"))).scalar_one() == 101


async def test_many_writers_of_one_process_all_get_their_turn(engine: AsyncEngine) -> None:
    maker = create_sessionmaker(engine)

    async def increment() -> None:
        async with unit_of_work(maker) as session:
            n = (await session.execute(text("SELECT n FROM t WHERE id = 1"))).scalar_one()
            await asyncio.sleep(0.005)  # work between the read and the write
            await session.execute(text("UPDATE t SET n = :n WHERE id = 1"), {"n": n + 1})

    async def quota_like_write() -> None:
        async with maker() as session, writing(session):
            await session.execute(text("UPDATE t SET n = n + 1000 WHERE id = 1"))
            await session.commit()

    await asyncio.gather(*(increment() for _ in range(40)), quota_like_write())
    async with maker() as session:
        assert (await session.execute(text("SELECT n FROM t WHERE id = 1"))).scalar_one() == 1040


async def test_failed_login_records_its_audit_event_without_waiting_for_itself(
    sqlite_app: Any,
) -> None:
    from sqlalchemy import select

    from atrium.models import AuditEvent

    user = await create_user(sqlite_app)
    transport = httpx.ASGITransport(app=sqlite_app, client=("127.0.0.1", 50007))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.post(
            "/v1/auth/login", data={"username": user.email, "password": "wrong password 123"}
        )
    # Before: the audit write waited for the write lock its own request held, for the whole
    # busy timeout, then failed (500).
    assert r.status_code == 401, r.text
    async with sqlite_app.state.sessionmaker() as session:
        actions = (await session.execute(select(AuditEvent.action))).scalars().all()
    assert "auth.login_failed" in actions


async def test_a_slow_upload_body_blocks_no_other_writer(sqlite_app: Any) -> None:
    """An upload whose body trickles in holds neither the writer turn nor the write lock."""
    from tests.support.factories import bearer, create_tenant

    owner = await create_user(sqlite_app)
    tenant = await create_tenant(sqlite_app, owner)
    headers = await bearer(owner)
    transport = httpx.ASGITransport(app=sqlite_app, client=("127.0.0.1", 50008))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", timeout=60
    ) as client:
        r = await client.post(
            f"/v1/tenants/{tenant.id}/collections", json={"name": "Slow"}, headers=headers
        )
        assert r.status_code == 201, r.text
        docs = f"/v1/tenants/{tenant.id}/collections/{r.json()['id']}/documents"
        started, finish = asyncio.Event(), asyncio.Event()
        boundary = "slowboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            'filename="slow.txt"\r\nContent-Type: text/plain\r\n\r\n'
        ).encode()

        async def trickle() -> Any:
            yield head + b"The first words of a slow upload. "
            started.set()
            await finish.wait()  # the client stalls mid-body
            yield b"The rest of it.\r\n" + f"--{boundary}--\r\n".encode()

        upload = asyncio.create_task(
            client.post(
                docs,
                content=trickle(),
                headers={**headers, "content-type": f"multipart/form-data; boundary={boundary}"},
            )
        )
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(0.2)  # the route has read the plan and the collection by now
        # Another writer of the same process meanwhile: a collection is created at once.
        r = await asyncio.wait_for(
            client.post(
                f"/v1/tenants/{tenant.id}/collections", json={"name": "Other"}, headers=headers
            ),
            10,
        )
        assert r.status_code == 201, r.text
        finish.set()
        r = await asyncio.wait_for(upload, 30)
        assert r.status_code == 202, r.text
