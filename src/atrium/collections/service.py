"""Collections: create, change, list, and delete (in the background, through Celery)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.audit.service import record
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Metric
from atrium.collections import schemas
from atrium.collections.repository import CollectionRepository, CollectionTotals, name_key
from atrium.context import ServiceContext
from atrium.kit.cache_versions import catalog_changed
from atrium.kit.enqueue import enqueue
from atrium.kit.errors import Conflict, NotFound
from atrium.kit.pagination import Page, Params, paginate_query
from atrium.kit.vectordb import DEFAULT_LANGUAGE
from atrium.models.ingestion import Collection, CollectionStatus

#: The Celery task that removes a collection's documents, chunks and files.
DELETE_TASK = "atrium.collections.delete"


def to_schema(collection: Collection, totals: CollectionTotals | None = None) -> schemas.Collection:
    """The response body of a collection."""
    totals = totals or CollectionTotals()
    return schemas.Collection(
        id=collection.id,
        name=collection.name,
        description=collection.description,
        metadata=collection.metadata_ or {},
        language=collection.language or DEFAULT_LANGUAGE,
        status=collection.status,
        document_count=totals.documents,
        chunk_count=totals.chunks,
        total_bytes=totals.bytes,
        created_at=collection.created_at,
        updated_at=collection.updated_at,
    )


def rows_to_schemas(rows: Sequence[Any]) -> list[schemas.Collection]:
    """Turn ``CollectionRepository.list_query`` rows into response bodies."""
    return [
        to_schema(
            row[0],
            CollectionTotals(int(row[1] or 0), int(row[2] or 0), int(row[3] or 0)),
        )
        for row in rows
    ]


async def list_page(
    session: AsyncSession, subject: AuthSubject, params: Params
) -> Page[schemas.Collection]:
    """One page of the tenant's collections by name, with their totals."""
    query = CollectionRepository(session, subject.tenant_id).list_query()
    return await paginate_query(session, query, params, rows_to_schemas)


def _name_taken(name: str) -> Conflict:
    return Conflict(f"A collection named '{name}' already exists in this tenant; pick another name")


async def _flush_unique(session: AsyncSession, collection: Collection, name: str) -> None:
    # The unique key settles a race between two requests creating the same name.
    try:
        async with session.begin_nested():
            session.add(collection)
            await session.flush()
    except IntegrityError:
        raise _name_taken(name) from None


async def get(session: AsyncSession, subject: AuthSubject, collection_id: uuid.UUID) -> Collection:
    """A collection of the subject's tenant (also while it is being deleted).

    Raises:
        NotFound: when it does not exist in this tenant.
    """
    collection = await CollectionRepository(session, subject.tenant_id).get(collection_id)
    if collection is None:
        raise NotFound("Collection not found")
    return collection


async def get_writable(
    session: AsyncSession, tenant_id: uuid.UUID, collection_id: uuid.UUID
) -> Collection:
    """A collection that may receive changes (not being deleted).

    Raises:
        NotFound: when it does not exist in this tenant.
        Conflict: when it is being deleted.
    """
    collection = await CollectionRepository(session, tenant_id).get(collection_id)
    if collection is None:
        raise NotFound("Collection not found")
    if collection.status is CollectionStatus.deleting:
        raise Conflict("This collection is being deleted; it accepts no more changes")
    return collection


async def with_totals(
    session: AsyncSession, subject: AuthSubject, collection: Collection
) -> schemas.Collection:
    """The response body of one collection, totals included."""
    totals = await CollectionRepository(session, subject.tenant_id).totals([collection.id])
    return to_schema(collection, totals.get(collection.id))


async def create(
    ctx: ServiceContext, subject: AuthSubject, data: schemas.CollectionCreate
) -> Collection:
    """Create a collection.

    Raises:
        Conflict: when the tenant already has a collection of that name.
    """
    session = ctx.session
    repo = CollectionRepository(session, subject.tenant_id)
    if await repo.by_name(data.name) is not None:
        raise _name_taken(data.name)
    collection = Collection(
        tenant_id=subject.tenant_id,
        name=data.name,
        name_key=name_key(data.name),
        description=data.description,
        metadata_=data.metadata,
        language=data.language,
        status=CollectionStatus.active,
    )
    # Plan limits (billing): a collection is held before it is created (402 when full).
    async with ctx.reserve(subject.tenant_id, Metric.collections, 1):
        await _flush_unique(session, collection, data.name)
    _audit(ctx, subject, "collection.created", collection, {"name": data.name})
    # Searches keep the tenant's collection list in memory under a token in Redis: replaced
    # when this unit of work commits, so the next search sees the new collection.
    catalog_changed(session, ctx.redis, subject.tenant_id)
    return collection


async def update(
    ctx: ServiceContext,
    subject: AuthSubject,
    collection_id: uuid.UUID,
    data: schemas.CollectionUpdate,
) -> Collection:
    """Change a collection's name, description or metadata.

    Raises:
        NotFound: when it does not exist in this tenant.
        Conflict: when it is being deleted, or the new name is taken.
    """
    session = ctx.session
    collection = await get_writable(session, subject.tenant_id, collection_id)
    changes = data.model_dump(exclude_unset=True, exclude_none=True)
    if changes.pop("language", collection.language) != collection.language:
        # Its chunks were stemmed in the old language: changing it would need every document
        # processed again, which is what a new collection does, visibly.
        raise Conflict(
            f"A collection's language is fixed at creation (this one is {collection.language!r}): "
            "create a new collection with the language you want and upload the documents there"
        )
    if "name" in changes and name_key(changes["name"]) != collection.name_key:
        other = await CollectionRepository(session, subject.tenant_id).by_name(changes["name"])
        if other is not None and other.id != collection.id:
            raise _name_taken(changes["name"])
    if "name" in changes:
        collection.name = changes["name"]
        collection.name_key = name_key(changes["name"])
    if "description" in changes:
        collection.description = changes["description"]
    if "metadata" in changes:
        collection.metadata_ = changes["metadata"]
    await _flush_unique(session, collection, collection.name)
    _audit(ctx, subject, "collection.updated", collection, {"fields": sorted(changes)})
    return collection


async def delete(ctx: ServiceContext, subject: AuthSubject, collection_id: uuid.UUID) -> Collection:
    """Mark a collection as being deleted and enqueue the removal of everything in it.

    The name is free again at once; the collection answers with status ``deleting`` until the
    task has removed its documents, chunks and files, and 404 after that. Deleting a collection
    that is already being deleted changes nothing.

    Raises:
        NotFound: when it does not exist in this tenant.
    """
    collection = await get(ctx.session, subject, collection_id)
    if collection.status is CollectionStatus.deleting:
        return collection
    collection.status = CollectionStatus.deleting
    collection.name_key = None
    await ctx.session.flush()
    catalog_changed(ctx.session, ctx.redis, subject.tenant_id)
    await ctx.adjust(subject.tenant_id, Metric.collections, -1)
    _audit(ctx, subject, "collection.deleted", collection, {"name": collection.name})
    enqueue(
        ctx.session,
        DELETE_TASK,
        tenant_id=str(subject.tenant_id),
        collection_id=str(collection.id),
    )
    return collection


def _audit(
    ctx: ServiceContext,
    subject: AuthSubject,
    action: str,
    collection: Collection,
    data: dict[str, Any],
) -> None:
    record(
        ctx.session,
        action,
        origin=ctx.origin,
        tenant_id=subject.tenant_id,
        actor_user_id=subject.user_id,
        actor_api_key_id=subject.api_key_id,
        target_type="collection",
        target_id=collection.id,
        data=data,
    )
