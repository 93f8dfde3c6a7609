"""The worker's queries across tenants: claiming queued documents, runs, the sweeper.

These cross tenants on purpose (decision 0017): a worker takes queued documents of any tenant
(:func:`adopt_queued`), a message delivered again releases what its dead run held
(:func:`release_job`), a run proves it is alive (:func:`heartbeat_run`) and finds the documents
it holds (:func:`held_by_run`), and the sweeper finds what stopped moving
(:func:`stuck_documents`, :func:`stuck_collections`). Every write is fenced by the run id, as in
:mod:`atrium.ingestion.repository`, which holds a tenant's own document queries.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.ingestion.repository import CLAIM_COLUMNS, Claimed, requeued, start_claimed
from atrium.models.base import utcnow
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus
from atrium.models.tenancy import Tenant, TenantStatus


async def stuck_documents(
    session: AsyncSession, older_than: dt.datetime, limit: int = 500
) -> list[Document]:
    """Documents (any tenant) queued, processing or deleting without a sign of life since
    ``older_than``; for the sweeper only."""
    query = (
        select(Document)
        .where(
            Document.status.in_(
                [DocumentStatus.queued, DocumentStatus.processing, DocumentStatus.deleting]
            ),
            Document.heartbeat_at < older_than,
        )
        .order_by(Document.heartbeat_at)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def stuck_collections(
    session: AsyncSession, older_than: dt.datetime, limit: int = 100
) -> list[Collection]:
    """Collections (any tenant) being deleted since before ``older_than``; for the sweeper."""
    query = (
        select(Collection)
        .where(Collection.status == CollectionStatus.deleting, Collection.updated_at < older_than)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def adopt_queued(
    session: AsyncSession,
    run_id: str,
    *,
    limit: int,
    queued_before: dt.datetime,
    max_bytes: int,
) -> list[Claimed]:
    """Claim up to ``limit`` more queued documents (any tenant) for the run ``run_id``.

    Only documents never started (``attempts`` 0: one that stopped a worker before runs alone
    from then on), no larger than ``max_bytes`` and queued since before ``queued_before`` (a
    backlog: a document that waited is one no idle worker took), oldest first. Rows another
    transaction holds (a worker claiming that very document) are skipped, not waited for.
    For the worker only; each document stays fenced by its own row.
    """
    if limit <= 0:
        return []
    ids = (
        (
            await session.execute(
                select(Document.id)
                .where(
                    Document.status == DocumentStatus.queued,
                    Document.heartbeat_at < queued_before,
                    Document.attempts == 0,
                    Document.size_bytes <= max_bytes,
                    Document.tenant_id.not_in(
                        select(Tenant.id).where(Tenant.status == TenantStatus.deleting)
                    ),
                )
                .order_by(Document.heartbeat_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    rows = (
        await session.execute(
            select(*CLAIM_COLUMNS)
            .join(Collection, Collection.id == Document.collection_id)
            .where(Document.id.in_(ids))
            .order_by(Document.heartbeat_at)
        )
    ).all()
    claimed = [await start_claimed(session, row, run_id) for row in rows]
    return [c for c in claimed if c is not None]


async def release_job(
    session: AsyncSession, job: str, keep: uuid.UUID, note: str
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Put back in the queue the documents that earlier runs of ``job`` still hold, except
    ``keep``; returns their ``(tenant_id, document_id)`` (each needs a job of its own again).

    A job's message is delivered again only when the worker running it died, so such rows
    belong to a dead run: whatever became of the job's own document (failed early, deleted),
    the documents that run adopted would otherwise wait for the sweeper. For the worker only.
    """
    held = (
        Document.status == DocumentStatus.processing,
        Document.run_id.like(f"{job}-%"),
        Document.id != keep,
    )
    # Every delivery asks, and almost always finds nothing: a plain read first, since a
    # locking one would lock every ``processing`` row it scans (other runs' too) until commit.
    ids = (await session.execute(select(Document.id).where(*held))).scalars().all()
    if not ids:
        return []
    rows = (
        await session.execute(
            select(Document.tenant_id, Document.id)
            .where(Document.id.in_(ids), *held)
            .with_for_update()
        )
    ).all()
    if rows:
        await session.execute(
            update(Document)
            .where(Document.id.in_([row[1] for row in rows]), *held)
            .values(**requeued(note))
        )
    return [(row[0], row[1]) for row in rows]


async def held_by_run(
    session: AsyncSession, run_id: str, ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    """The documents among ``ids`` that the run ``run_id`` still holds, in an active
    collection. By run, not tenant: a run's id is its fence (for ``atrium import``)."""
    rows = await session.execute(
        select(Document.id)
        .join(Collection, Collection.id == Document.collection_id)
        .where(
            Document.id.in_(list(ids)),
            Document.run_id == run_id,
            Document.status == DocumentStatus.processing,
            Collection.status == CollectionStatus.active,
        )
    )
    return {row[0] for row in rows}


async def heartbeat_run(session: AsyncSession, run_id: str) -> None:
    """Show that the run is alive on every document it holds (one statement)."""
    await session.execute(
        update(Document)
        .where(Document.run_id == run_id, Document.status == DocumentStatus.processing)
        .values(heartbeat_at=utcnow())
    )
