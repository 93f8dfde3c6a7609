"""SQL of collections, always scoped to one tenant."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Select, and_, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from atrium.kit.repository import TenantRepository
from atrium.models.ingestion import Collection, CollectionStatus, Document, DocumentStatus


def name_key(name: str) -> str:
    """The key that makes names unique in a tenant: case-insensitive, collation-independent."""
    return hashlib.sha256(name.strip().casefold().encode()).hexdigest()


@dataclass(frozen=True)
class CollectionTotals:
    """What a collection holds."""

    documents: int = 0
    chunks: int = 0
    bytes: int = 0


class CollectionRepository(TenantRepository[Collection]):
    """Collections of one tenant."""

    model = Collection

    def _stats(self) -> Any:
        return (
            select(
                Document.collection_id.label("collection_id"),
                func.count().label("documents"),
                func.coalesce(func.sum(Document.chunk_count), 0).label("chunks"),
                func.coalesce(func.sum(Document.size_bytes), 0).label("bytes"),
            )
            .where(
                Document.tenant_id == self.tenant_id,
                Document.status != DocumentStatus.deleting,
            )
            .group_by(Document.collection_id)
            .subquery("stats")
        )

    def list_query(self) -> Select[Any]:
        """Every collection of the tenant with its totals, by name."""
        stats = self._stats()
        return (
            self.select(Collection, stats.c.documents, stats.c.chunks, stats.c.bytes)
            .outerjoin(stats, stats.c.collection_id == Collection.id)
            .order_by(Collection.name, Collection.id)
        )

    async def by_name(self, name: str) -> Collection | None:
        """The live collection with this name (any case), if any."""
        query = self.select().where(Collection.name_key == name_key(name))
        return (await self.session.execute(query)).scalar_one_or_none()

    async def by_reference(self, ref: str) -> list[Collection]:
        """The collections ``ref`` names: its id when it reads as one, else its exact name
        (several may share a name in another case, or a live one and one being deleted)."""
        query = self.select()
        try:
            query = query.where(Collection.id == uuid.UUID(ref))
        except ValueError:
            query = query.where(Collection.name == ref)
        return list((await self.session.execute(query)).scalars().all())

    async def totals(
        self, collection_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, CollectionTotals]:
        """Totals of the given collections (missing ones hold nothing)."""
        if not collection_ids:
            return {}
        stats = self._stats()
        rows = await self.session.execute(
            select(stats).where(stats.c.collection_id.in_(list(collection_ids)))
        )
        return {
            row.collection_id: CollectionTotals(int(row.documents), int(row.chunks), int(row.bytes))
            for row in rows
        }


#: A row of a tenant's search catalog: a collection, its status, one of its documents being
#: deleted (None when it has none) and its full-text language.
CatalogRow = tuple[uuid.UUID, CollectionStatus, uuid.UUID | None, str]

# Every collection of the tenant, joined with its documents being deleted: one round trip.
# Built once (bound parameter for the tenant): constructing it costs more than running it.
_CATALOG_TENANT: BindParameter[uuid.UUID] = bindparam("tenant_id")
_CATALOG = (
    select(Collection.id, Collection.status, Document.id, Collection.language)
    .outerjoin(
        Document,
        and_(
            Document.collection_id == Collection.id,
            Document.tenant_id == _CATALOG_TENANT,
            Document.status == DocumentStatus.deleting,
        ),
    )
    .where(Collection.tenant_id == _CATALOG_TENANT)
)


async def catalog_rows(conn: AsyncConnection, tenant_id: uuid.UUID) -> list[CatalogRow]:
    """The tenant's search catalog (``collections.catalog``): every collection of the tenant,
    once per document of it being deleted.

    Scoped to one tenant, yet a module function rather than a :class:`CollectionRepository`
    method: it is on the search's hot path, so it runs a statement built once at import (the
    tenant a bound parameter; building it per call cost more than running it) on a bare
    connection (a search writes nothing, so it opens no session or unit of work).
    """
    result = await conn.execute(_CATALOG, {"tenant_id": tenant_id})
    return [(r[0], r[1], r[2], r[3]) for r in result.all()]
