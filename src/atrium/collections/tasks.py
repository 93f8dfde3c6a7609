"""Celery tasks of collections: removing a deleted collection with everything in it."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Task

from atrium.billing.quota import Metric, Quota
from atrium.collections.repository import CollectionRepository
from atrium.collections.service import DELETE_TASK
from atrium.ingestion.faults import is_transient
from atrium.ingestion.pipeline import backoff
from atrium.ingestion.repository import DocumentRepository
from atrium.ingestion.service import collection_prefix
from atrium.ingestion.vectorstore import delete_collection_chunks
from atrium.kit import runtime
from atrium.kit.blobstore import get_blobstore
from atrium.kit.cache_versions import bump_collection_version
from atrium.kit.db import unit_of_work
from atrium.models.ingestion import CollectionStatus
from atrium.worker import celery_app


@celery_app.task(name=DELETE_TASK, bind=True, max_retries=10)
def delete_collection(self: Task, *, tenant_id: str, collection_id: str) -> dict[str, Any]:
    """Remove a collection marked ``deleting``: stop its documents, drop their chunks and
    files, then the rows. Safe to run twice; a crash part-way is finished by a re-run."""
    tenant, collection = uuid.UUID(tenant_id), uuid.UUID(collection_id)

    async def _run() -> dict[str, Any]:
        res = await runtime.resources()
        # 1. Every document stops: committed before the chunks go, so a writer that takes its
        #    lock after our DELETE sees it and writes nothing (see ingestion.vectorstore).
        async with unit_of_work(res.sessionmaker) as session:
            row = await CollectionRepository(session, tenant).get(collection)
            if row is None or row.status is not CollectionStatus.deleting:
                return {"deleted": False}
            documents = DocumentRepository(session, tenant)
            # What its live documents count against the plan.
            live_documents, live_bytes, live_chunks = await documents.live_totals(collection)
            await documents.mark_collection_deleting(collection)
        # Plan limits (billing): the collection's documents, bytes and chunks stop counting.
        quota = Quota.for_resources(res)
        await quota.adjust(tenant, Metric.documents, -live_documents)
        await quota.adjust(tenant, Metric.stored_bytes, -live_bytes)
        await quota.adjust(tenant, Metric.chunks, -live_chunks)
        # 2. Chunks, then files.
        async with res.vector_pool.connection() as conn:
            chunks = await delete_collection_chunks(conn, tenant, collection)
        files = await get_blobstore(res.settings).delete_prefix(
            collection_prefix(tenant, collection)
        )
        # 3. The rows (documents go with their collection: ON DELETE CASCADE), after the
        #    version moved: see ingestion.tasks.delete_document.
        await bump_collection_version(res.redis, tenant, collection)
        async with unit_of_work(res.sessionmaker) as session:
            row = await CollectionRepository(session, tenant).get(collection)
            if row is not None:
                await session.delete(row)
        return {"deleted": True, "chunks": chunks, "files": files}

    try:
        return runtime.run(_run())
    except Exception as exc:
        if is_transient(exc):
            raise self.retry(countdown=backoff(int(self.request.retries or 0)), exc=exc) from exc
        raise
