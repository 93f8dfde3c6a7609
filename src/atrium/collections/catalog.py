"""Which chunks a search may see: the requested collections, checked against the tenant's.

Deletion is asynchronous: a collection or document is first marked ``deleting`` (committed),
and a task then removes its chunks. Searches leave out both from the moment of the mark, so a
deleted document never shows up again, even before its chunks are gone.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.collections.repository import CatalogRow, catalog_rows
from atrium.kit.errors import NotFound
from atrium.models.ingestion import CollectionStatus


@dataclass(frozen=True)
class Wanted:
    """The collections of one search.

    Attributes:
        ids: the searchable collections covered, sorted (for the cache key's versions).
        restrict: the collection ids to put in the SQL, or None when the search covers every
            chunk of the tenant's partition (no collection condition needed).
        exclude_documents: documents being deleted in those collections (sorted).
        languages: the full-text languages of those collections (sorted, distinct).
    """

    ids: list[uuid.UUID]
    restrict: list[uuid.UUID] | None
    exclude_documents: list[uuid.UUID]
    languages: list[str]


#: Each search process keeps every tenant's catalog rows under the tenant's catalog token
#: (:mod:`atrium.kit.cache_versions`): a search reads the token with the collection versions
#: it needs anyway, and the account database only after a collection was created or deleted
#: or a document deleted. Bounded: emptied when full (a re-read costs one query).
_CATALOGS: dict[uuid.UUID, tuple[str, list[CatalogRow]]] = {}
_CATALOGS_MAX = 10_000


async def _catalog(
    engine: AsyncEngine, tenant_id: uuid.UUID, token: str | None
) -> list[CatalogRow]:
    if token is not None:
        cached = _CATALOGS.get(tenant_id)
        if cached is not None and cached[0] == token:
            return cached[1]
    # One read on a pooled connection of its own: a search writes nothing to the account
    # database, so it skips the request's unit of work (session, commit) altogether.
    async with engine.connect() as conn:
        rows = await catalog_rows(conn, tenant_id)
    if token is not None:
        if len(_CATALOGS) >= _CATALOGS_MAX:
            _CATALOGS.clear()
        _CATALOGS[tenant_id] = (token, rows)
    return rows


async def resolve(
    engine: AsyncEngine,
    tenant_id: uuid.UUID,
    requested: Sequence[uuid.UUID] | None,
    catalog_token: str | None = None,
) -> Wanted:
    """The collections to search for ``tenant_id``.

    Args:
        engine: the account database.
        tenant_id: the caller's tenant.
        requested: the request's ``collection_ids``, or None for all of the tenant's.
        catalog_token: the tenant's current catalog token: rows read under the same token
            are reused; None reads the database.

    Raises:
        NotFound: a requested collection is not an active collection of this tenant (another
            tenant's collection is reported exactly like one that does not exist).
    """
    rows = await _catalog(engine, tenant_id, catalog_token)
    statuses = {cid: status for cid, status, _, _ in rows}
    active = sorted(cid for cid, status in statuses.items() if status is CollectionStatus.active)
    if requested is None:
        wanted = active
        # Collections being deleted may still have chunks in the partition until the purge
        # finishes; only then is an unrestricted query safe.
        restrict = None if len(active) == len(statuses) else active
    else:
        wanted = sorted(set(requested))
        active_set = set(active)
        missing = [c for c in wanted if c not in active_set]
        if missing:
            raise NotFound(
                f"Collection {missing[0]} not found",
                detail={
                    "message": f"Collection {missing[0]} not found",
                    "collection_ids": [str(c) for c in missing],
                },
            )
        restrict = None if len(wanted) == len(statuses) else wanted
    wanted_set = set(wanted)
    exclude = sorted({doc for cid, _, doc, _ in rows if doc is not None and cid in wanted_set})
    languages = sorted({lang for cid, _, _, lang in rows if cid in wanted_set})
    return Wanted(ids=wanted, restrict=restrict, exclude_documents=exclude, languages=languages)
