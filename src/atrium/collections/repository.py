"""SQL of collections, always scoped to one tenant."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select

from atrium.kit.repository import TenantRepository
from atrium.models.ingestion import Collection, Document, DocumentStatus


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
