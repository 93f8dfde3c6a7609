"""Routes: create, list, read, change and delete a tenant's collections."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, status

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.collections import service
from atrium.collections.schemas import Collection, CollectionCreate, CollectionUpdate
from atrium.context import Ctx
from atrium.kit.db import DBSession
from atrium.kit.pagination import Page, Params
from atrium.kit.responses import TENANT, errors

router = APIRouter(
    prefix="/tenants/{tenant_id}/collections", tags=["collections"], responses=TENANT
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Collection,
    summary="Create a collection",
    responses=errors(402, 409),
)
async def create_collection(
    tenant_id: uuid.UUID,
    data: CollectionCreate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.collections_write)),
) -> Collection:
    """Create an empty collection. Names are unique in the tenant, regardless of case (409)."""
    collection = await service.create(ctx, subject, data)
    return service.to_schema(collection)


@router.get(
    "",
    response_model=Page[Collection],
    summary="List collections",
)
async def list_collections(
    tenant_id: uuid.UUID,
    session: DBSession,
    params: Annotated[Params, Depends()],
    subject: AuthSubject = Depends(require(Permission.collections_read)),
) -> Any:
    """The tenant's collections by name, with document, chunk and byte totals."""
    return await service.list_page(session, subject, params)


@router.get(
    "/{collection_id}",
    response_model=Collection,
    summary="Get a collection",
)
async def get_collection(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    session: DBSession,
    subject: AuthSubject = Depends(require(Permission.collections_read)),
) -> Collection:
    """One collection with its totals. While it is being deleted its status is `deleting`."""
    collection = await service.get(session, subject, collection_id)
    return await service.with_totals(session, subject, collection)


@router.patch(
    "/{collection_id}",
    response_model=Collection,
    summary="Change a collection",
    responses=errors(409),
)
async def update_collection(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    data: CollectionUpdate,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.collections_write)),
) -> Collection:
    """Rename a collection or change its description or metadata.

    409 when the new name is taken or the collection is being deleted.
    """
    collection = await service.update(ctx, subject, collection_id, data)
    return await service.with_totals(ctx.session, subject, collection)


@router.delete(
    "/{collection_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Collection,
    summary="Delete a collection",
)
async def delete_collection(
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    ctx: Ctx,
    subject: AuthSubject = Depends(require(Permission.collections_write)),
) -> Collection:
    """Delete a collection with all its documents, chunks and files.

    Answers 202 at once: the removal runs in the background. Until it is done the collection
    is listed with status `deleting` (and accepts no uploads); then it answers 404. Its name
    can be used for a new collection immediately.
    """
    collection = await service.delete(ctx, subject, collection_id)
    return await service.with_totals(ctx.session, subject, collection)
