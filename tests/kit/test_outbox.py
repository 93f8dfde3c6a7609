"""No job is lost: the transactional outbox (kit/enqueue.py) and its relay (kit/outbox.py).

In-process tests on MariaDB: the outbox row commits or rolls back with the work, the relay
publishes old rows once (``SKIP LOCKED``: a row another relay holds is left to it), and a mail
job delivered twice under one task id is sent once.

End to end on ``atrium dev`` (SQLite account database) with the Celery broker on a private
``redis-server``: the broker stops between a request's commit and its publication; the
requests still answer 2xx, and once the broker is back the document becomes ``ready`` and the
verification mail arrives exactly once. Before the outbox these requests answered 500 after
committing, and their jobs were gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email
import email.policy
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from atrium.kit.enqueue import enqueue, pending_jobs
from atrium.models import OutboxJob
from atrium.models.base import utcnow
from tests.support.broker import Broker
from tests.support.load import PASSWORD, DevServer, free_port, sign_up

#: tests.support.tasks.RECORD_TASK (importing it here would build the Celery app too early).
RECORD_TASK = "tests.record"


async def _outbox_ids(app: Any) -> set[uuid.UUID]:
    async with app.state.sessionmaker() as session:
        return set(await session.scalars(select(OutboxJob.id)))


async def _wait_key(redis: Any, key: str, timeout: float = 30.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await redis.get(key)
        if value is not None:
            return str(value)
        await asyncio.sleep(0.1)
    return None


async def test_enqueue_writes_the_outbox_row_in_the_same_transaction(
    app: Any, clean_state: None
) -> None:
    maker = app.state.sessionmaker
    async with maker() as session:
        enqueue(session, RECORD_TASK, key="k", value="rolled back")
        (job,) = pending_jobs(session)
        await session.flush()
        # Inside the transaction the row is there; outside it is not, until commit.
        assert await session.get(OutboxJob, job.id) is not None
        assert job.id not in await _outbox_ids(app)
        await session.rollback()
    assert job.id not in await _outbox_ids(app)

    async with maker() as session:
        enqueue(session, RECORD_TASK, countdown=5, key="k", value="committed")
        (job,) = pending_jobs(session)
        await session.commit()
    async with maker() as session:
        row = await session.get(OutboxJob, job.id)
        assert row is not None
        assert (row.task, row.kwargs, row.options) == (
            RECORD_TASK,
            {"key": "k", "value": "committed"},
            {"countdown": 5},
        )


async def test_a_committed_request_publishes_its_jobs_and_empties_the_outbox(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    from atrium.kit.db import unit_of_work

    key = f"t:{uuid.uuid4()}"
    async with unit_of_work(app.state.sessionmaker) as session:
        enqueue(session, RECORD_TASK, key=key, value="sent")
        (job,) = pending_jobs(session)
    assert await _wait_key(app.state.redis, key) == "sent"
    assert job.id not in await _outbox_ids(app)


async def _old_rows(app: Any, keys: list[str], age: float = 120.0) -> list[uuid.UUID]:
    """Outbox rows of record jobs, committed ``age`` seconds ago (as if never published)."""
    async with app.state.sessionmaker() as session:
        for key in keys:
            enqueue(session, RECORD_TASK, key=key, value="relayed")
        ids = [job.id for job in pending_jobs(session)]
        await session.flush()
        then = utcnow() - dt.timedelta(seconds=age)
        await session.execute(
            update(OutboxJob).where(OutboxJob.id.in_(ids)).values(created_at=then)
        )
        await session.commit()
    return ids


async def test_relay_publishes_old_rows_once_and_leaves_young_ones(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    from atrium.kit.outbox import relay

    keys = [f"t:{uuid.uuid4()}" for _ in range(5)]
    old = await _old_rows(app, keys)
    async with app.state.sessionmaker() as session:
        enqueue(session, RECORD_TASK, key="young", value="too early")
        (young,) = pending_jobs(session)
        await session.commit()

    # Two relays at once (two workers' beat ticks): each row is published by one of them.
    results = await asyncio.gather(relay(app.state.sessionmaker), relay(app.state.sessionmaker))
    assert sum(r["published"] for r in results) == len(old)
    assert await _outbox_ids(app) == {young.id}
    for key in keys:
        assert await _wait_key(app.state.redis, key) == "relayed"


async def test_relay_skips_a_row_another_relay_holds(
    app: Any, client: httpx.AsyncClient, celery_worker: Any
) -> None:
    from atrium.kit.outbox import relay

    held_key, free_key = f"t:{uuid.uuid4()}", f"t:{uuid.uuid4()}"
    held, _ = await _old_rows(app, [held_key, free_key])
    async with app.state.sessionmaker() as other:
        # Another relay's transaction holds this row (FOR UPDATE) while it publishes.
        await other.execute(select(OutboxJob).where(OutboxJob.id == held).with_for_update())
        counts = await asyncio.wait_for(relay(app.state.sessionmaker), 60)
        assert counts == {"published": 1, "left": 0}
        await other.rollback()
    assert await _wait_key(app.state.redis, free_key) == "relayed"
    assert await _outbox_ids(app) == {held}


async def test_a_mail_job_delivered_twice_is_sent_once(
    app: Any, client: httpx.AsyncClient, celery_worker: Any, mailbox: Any
) -> None:
    from atrium.worker import celery_app

    to = f"twice-{uuid.uuid4().hex[:8]}@example.com"
    task_id = str(uuid.uuid4())
    kwargs = {
        "template": "verify_email",
        "to": [to],
        "context": {"name": "Ada", "link": "http://testserver/verify-email?token=t", "hours": 24},
    }
    sentinel = f"t:{uuid.uuid4()}"

    def _send() -> None:
        # Published, the delete failed, the relay published it again: same task id.
        celery_app.send_task("atrium.email.send", kwargs=kwargs, task_id=task_id)
        celery_app.send_task("atrium.email.send", kwargs=kwargs, task_id=task_id)
        # The test worker runs one task at a time in order: once this ran, both copies did.
        celery_app.send_task(RECORD_TASK, kwargs={"key": sentinel, "value": "after"})

    await asyncio.to_thread(_send)
    assert await _wait_key(app.state.redis, sentinel, timeout=60) == "after"
    assert len(mailbox.all(to)) == 1


# --- End to end: the broker stops between commit and publication ------------------------------


def _mails_to(outbox: Path, address: str) -> int:
    count = 0
    for path in outbox.glob("*.eml"):
        with path.open("rb") as fh:
            message = email.message_from_binary_file(fh, policy=email.policy.default)
        if address in str(message["To"]):
            count += 1
    return count


def _outbox_rows(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'atrium.db'}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM job_outbox").fetchone()[0])


async def _document_status(client: httpx.AsyncClient, tenant: Any, document_id: str) -> str:
    r = await client.get(tenant.documents_url, params={"size": 100}, headers=tenant.headers)
    while r.status_code == 429:  # the free plan's per-key rate limit; polling is not the point
        await asyncio.sleep(float(r.headers.get("Retry-After", "5")))
        r = await client.get(tenant.documents_url, params={"size": 100}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    found = {item["id"]: item["status"] for item in r.json()["items"]}
    return str(found.get(document_id, "missing"))


async def _wait_ready(client: httpx.AsyncClient, tenant: Any, document_id: str) -> None:
    deadline = time.monotonic() + 240
    status = ""
    while time.monotonic() < deadline:
        status = await _document_status(client, tenant, document_id)
        if status in ("ready", "failed"):
            break
        await asyncio.sleep(2)
    assert status == "ready", status


async def _upload(client: httpx.AsyncClient, tenant: Any, name: str) -> str:
    body = f"# {name}\n\nThe outbox keeps every job until the broker takes it.\n".encode()
    r = await client.post(
        tenant.documents_url,
        files=[("files", (f"{name}.md", body, "text/markdown"))],
        headers=tenant.headers,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["documents"][0]["id"])


@contextlib.asynccontextmanager
async def _reporting(server: DevServer) -> AsyncIterator[None]:
    """A connection error means ``atrium dev`` went away: fail with its log, which says why."""
    try:
        yield
    except httpx.TransportError as exc:
        code = server.proc.poll() if server.proc is not None else None
        message = f"atrium dev unreachable (exit code {code}):\n{server.tail()}"
        raise AssertionError(message) from exc


@pytest.mark.xdist_group("embedded-load")
async def test_no_job_is_lost_while_the_broker_is_down(tmp_path: Path) -> None:
    broker = Broker(free_port(), tmp_path / "broker")
    data_dir = tmp_path / "data"
    outbox = data_dir / "outbox"
    server = DevServer(
        data_dir,
        {"ATRIUM_CELERY_BROKER_URL": broker.url, "ATRIUM_CELERY_RELAY_INTERVAL_SECONDS": "2"},
    )
    broker.start()
    try:
        server.start()
        client = httpx.AsyncClient(base_url=server.url, timeout=120)
        async with _reporting(server), client:
            tenant = await sign_up(client, outbox)
            first = await _upload(client, tenant, "before")
            await _wait_ready(client, tenant, first)

            broker.stop()
            address = f"outage-{uuid.uuid4().hex[:8]}@example.com"
            r = await client.post(
                "/v1/auth/register",
                json={"email": address, "password": PASSWORD, "name": "Ada", "tenant_name": "A"},
            )
            assert r.status_code in (200, 201, 202), (r.status_code, r.text, server.tail())
            second = await _upload(client, tenant, "during")
            assert await _document_status(client, tenant, second) == "queued"
            assert _outbox_rows(data_dir) >= 2  # both jobs kept, not lost
            broker.start()

            await _wait_ready(client, tenant, second)
            deadline = time.monotonic() + 180
            while _mails_to(outbox, address) == 0 or _outbox_rows(data_dir):
                assert time.monotonic() < deadline, server.tail()
                await asyncio.sleep(0.5)
        # The outbox is empty: nothing is left to publish, so nothing more can arrive.
        assert _mails_to(outbox, address) == 1
        assert '"jobs_not_sent"' in server.log.read_text(errors="replace")
    finally:
        server.stop()
        broker.stop()
