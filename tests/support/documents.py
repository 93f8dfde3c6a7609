"""Helpers of the document and ingestion tests: a tenant with a collection, uploads, waiting for a
document's status, its chunks in the vector database, a collection's lock, draining the worker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
from sqlalchemy import update

from atrium.ingestion.vectorstore import lock_key
from atrium.models import Tenant
from tests.support.factories import bearer, create_tenant, create_user
from tests.support.files import PROSE


class Ctx:
    """A tenant with an owner, a collection, and the owner's headers."""

    def __init__(self, tenant: Any, headers: dict[str, str], collection_id: str) -> None:
        self.tenant = tenant
        self.headers = headers
        self.collection_id = collection_id

    @property
    def base(self) -> str:
        return f"/v1/tenants/{self.tenant.id}/collections/{self.collection_id}"

    @property
    def docs(self) -> str:
        return f"{self.base}/documents"


async def setup_tenant(app: Any, client: httpx.AsyncClient, name: str = "Docs") -> Ctx:
    owner = await create_user(app)
    tenant = await create_tenant(app, owner)
    # The enterprise plan: these tests poll documents faster than the free plan's request rate.
    async with app.state.sessionmaker() as session:
        await session.execute(
            update(Tenant).where(Tenant.id == tenant.id).values(plan="enterprise")
        )
        await session.commit()
    headers = await bearer(owner)
    r = await client.post(
        f"/v1/tenants/{tenant.id}/collections", json={"name": name}, headers=headers
    )
    assert r.status_code == 201, r.text
    return Ctx(tenant, headers, r.json()["id"])


async def wait_document(
    client: httpx.AsyncClient,
    ctx: Ctx,
    document_id: str,
    until: tuple[str, ...] = ("ready", "failed"),
    timeout: float = 120.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(f"{ctx.docs}/{document_id}", headers=ctx.headers)
        if r.status_code == 429:
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            continue
        if r.status_code == 404 and "gone" in until:
            return {"status": "gone"}
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in until:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"document did not reach {until}: {body}")


async def chunk_rows(settings: Any, document_id: str) -> list[tuple[str, int, str]]:
    """(partition, ordinal, text) of every chunk of the document, in any tenant's partition."""
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        cur = await conn.execute(
            "SELECT tableoid::regclass::text, ordinal, text FROM chunks WHERE document_id = %s"
            " ORDER BY ordinal",
            (uuid.UUID(document_id),),
        )
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def partition_count(settings: Any, tenant_id: uuid.UUID) -> int:
    async with await psycopg.AsyncConnection.connect(settings.vector_conninfo) as conn:
        cur = await conn.execute("SELECT count(*) FROM chunks WHERE tenant_id = %s", (tenant_id,))
        row = await cur.fetchone()
        return int(row[0]) if row else 0


def prose(words: int) -> str:
    sentences = PROSE.split(". ")
    out: list[str] = []
    count = 0
    i = 0
    while count < words:
        sentence = f"Item {i}: " + sentences[i % 2].strip().rstrip(".") + "."
        out.append(sentence)
        count += len(sentence.split())
        i += 1
        if i % 6 == 0:
            out.append("\n\n")
    return " ".join(out)


async def upload_files(
    client: httpx.AsyncClient,
    ctx: Ctx,
    files: list[tuple[str, bytes, str | None]],
    **data: str,
) -> httpx.Response:
    parts = [
        ("files", (name, content, ctype) if ctype else (name, content))
        for name, content, ctype in files
    ]
    return await client.post(ctx.docs, files=parts, data=data, headers=ctx.headers)


class HeldLock:
    """A collection's advisory lock in the vector database, held by the test (see
    :func:`hold_collection_lock`)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], key: int) -> None:
        self.conn = conn
        self.key = key

    async def wait_for_writer(self, timeout: float = 120.0) -> None:
        """Return once another session waits for this lock: a processing run that embedded
        its document and stopped at its store stage, before writing a chunk."""
        # pg_locks shows a bigint key as its high and low 32 bits (classid, objid; objsubid 1).
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cur = await self.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
                (unsigned >> 32, unsigned & 0xFFFF_FFFF),
            )
            row = await cur.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("no processing run reached its store stage")

    async def release(self) -> None:
        """Let the waiting run go on."""
        cur = await self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        row = await cur.fetchone()
        assert row is not None and row[0] is True


@contextlib.asynccontextmanager
async def hold_collection_lock(settings: Any, collection_id: str) -> AsyncIterator[HeldLock]:
    """Hold the lock that deleting a collection takes (``ingestion.vectorstore``).

    A run writing a document of the collection takes it (shared) before asking whether it may
    still write, so while the test holds it every such run stops at its store stage, with its
    document ``processing``: the moment a deletion races with. Closing the connection releases
    it whatever happens.
    """
    async with await psycopg.AsyncConnection.connect(
        settings.vector_conninfo, autocommit=True
    ) as conn:
        key = lock_key(uuid.UUID(collection_id))
        await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        yield HeldLock(conn, key)


async def drain_worker(app: Any, timeout: float = 120.0) -> None:
    """Return once the session's worker has finished every task sent before this call.

    The worker runs one task at a time (``--pool=solo``) from one queue, which the broker hands
    out in order, one message at a time (``worker_prefetch_multiplier=1``, late acks): once a
    marker task sent now has run, every task sent before it has ended (a retry with a countdown
    excepted).
    """
    from atrium.worker import celery_app
    from tests.support.tasks import RECORD_TASK

    key = f"tests:drained:{uuid.uuid4()}"
    await asyncio.to_thread(celery_app.send_task, RECORD_TASK, kwargs={"key": key, "value": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await app.state.redis.get(key) is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker did not run the marker task")


async def queued_jobs(settings: Any, task: str, **kwargs: str) -> int:
    """How many messages of ``task`` with these arguments wait in the broker's queue."""
    import redis.asyncio as aioredis

    from atrium.worker import celery_app

    broker = aioredis.from_url(settings.celery_broker_url)
    try:
        raw = await broker.lrange(celery_app.conf.task_default_queue, 0, -1)
    finally:
        await broker.aclose()
    count = 0
    for item in raw:
        message = json.loads(item)
        _, message_kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if message["headers"]["task"] == task and kwargs.items() <= message_kwargs.items():
            count += 1
    return count


async def usage_now(client: httpx.AsyncClient, ctx: Ctx, metric: str) -> tuple[int, int]:
    """``(used, reserved)`` of one metric of the tenant's usage."""
    r = await client.get(f"/v1/tenants/{ctx.tenant.id}/usage", headers=ctx.headers)
    assert r.status_code == 200, r.text
    entry = next(m for m in r.json()["metrics"] if m["metric"] == metric)
    return entry["used"], entry["reserved"]
