"""The vector-database side of a bulk import (``atrium import``, see ``ingestion.bulk``).

Two ways in, chosen by what the tenant's partition holds when the import starts:

* **build** (no partition, or an empty one): chunks are COPY'd into a standalone table shaped
  like a partition, with a ``CHECK`` on the tenant so that ATTACH needs no scan; its HNSW, GIN
  and other indexes (and the primary and unique keys, so ATTACH adopts them instead of building
  its own) are built once, after the last row, with generous ``maintenance_work_mem``; then one
  short transaction attaches it as the tenant's partition, registers it and counts its BM25
  statistics. Searches of other tenants never see the table before it is complete; the tenant
  had nothing to find before.
* **live** (the partition holds chunks): each group of documents is COPY'd into the live
  partition in one transaction under the same advisory locks as ``vectorstore`` (collection
  shared, each document exclusive) with its BM25 statistics, so PostgreSQL maintains the indexes
  and every search keeps working while the import runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from atrium.ingestion.vectorstore import (
    _COLUMNS,
    _COPY_TYPES,
    _apply_text_delta,
    _summarise,
    lock_key,
    recount_text_stats,
)
from atrium.kit.vectordb import partition_name

#: ``maintenance_work_mem`` for the index builds of a standalone table: an HNSW graph built in
#: memory is several times faster than one that spills (pgvector's notice says when it does).
BUILD_MEMORY = "1GB"


@dataclass
class Rows:
    """One document's chunks, ready to COPY.

    Attributes:
        collection_id: its collection.
        document_id: the document.
        texts: chunk texts in order.
        token_counts: tokens per chunk.
        embeddings: one vector per chunk.
        metadata: stored on every chunk.
        language: the collection's full-text configuration.
    """

    collection_id: uuid.UUID
    document_id: uuid.UUID
    texts: Sequence[str]
    token_counts: Sequence[int]
    embeddings: npt.NDArray[np.float32]
    metadata: dict[str, Any]
    language: str


def staging_name(tenant_id: uuid.UUID) -> str:
    """The standalone table a build-mode import fills (one per tenant: one import at a time)."""
    return f"chunks_import_{tenant_id.hex}"


def _ensure_lock(tenant_id: uuid.UUID) -> int:
    # The key ``kit.vectordb.ensure_tenant_partition`` takes: creating and attaching the
    # tenant's partition are serialised with the lazy creation by a first normal write.
    return int.from_bytes(tenant_id.bytes[8:], "big", signed=True)


async def prepare(conn: AsyncConnection[Any]) -> None:
    """Register pgvector's types on an autocommit connection."""
    if conn.adapters.types.get("vector") is None:
        await register_vector_async(conn)


async def partition_has_chunks(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> bool:
    """Whether the tenant's partition exists and holds at least one chunk."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (partition_name(tenant_id),))
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    part = sql.Identifier(partition_name(tenant_id))
    cur = await conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(part))
    row = await cur.fetchone()
    return bool(row and row[0])


async def create_staging(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> None:
    """(Re)create the empty standalone table of a build: the parent's columns, defaults,
    generated columns, storage and NOT NULLs, and the partition's bound as a CHECK.

    A table left by an interrupted import is dropped first: it was never attached, so nothing
    searched it.
    """
    table = sql.Identifier(staging_name(tenant_id))
    async with conn.transaction():
        await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE chunks INCLUDING DEFAULTS INCLUDING GENERATED"
                " INCLUDING STORAGE INCLUDING CONSTRAINTS, CHECK (tenant_id = {}))"
            ).format(table, sql.Literal(str(tenant_id)))
        )


async def drop_staging(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> None:
    """Drop the standalone table if it is still there (an import that attached nothing)."""
    await conn.execute(
        sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(staging_name(tenant_id)))
    )


async def _copy(
    conn: AsyncConnection[Any], table: sql.Identifier, tenant_id: uuid.UUID, docs: Iterable[Rows]
) -> int:
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
    )
    written = 0
    async with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        copy.set_types(_COPY_TYPES)
        for doc in docs:
            meta = Jsonb(doc.metadata)
            for ordinal, (text, tokens) in enumerate(zip(doc.texts, doc.token_counts, strict=True)):
                await copy.write_row(
                    (
                        tenant_id,
                        doc.language,
                        uuid.uuid4(),
                        doc.collection_id,
                        doc.document_id,
                        ordinal,
                        text,
                        int(tokens),
                        meta,
                        doc.embeddings[ordinal],
                    )
                )
                written += 1
    return written


async def copy_to_staging(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, docs: Sequence[Rows]
) -> int:
    """COPY a group of documents' chunks into the standalone table (no index yet: cheap)."""
    async with conn.transaction():
        return await _copy(conn, sql.Identifier(staging_name(tenant_id)), tenant_id, docs)


async def copy_live(
    conn: AsyncConnection[Any],
    tenant_id: uuid.UUID,
    docs: Sequence[Rows],
    owned: Any,
) -> list[uuid.UUID]:
    """COPY a group of documents' chunks into the tenant's live partition, in one transaction
    with their BM25 statistics, under ``vectorstore``'s advisory locks.

    Args:
        conn: an autocommit connection (types registered).
        tenant_id: the owner.
        docs: the group (all of one collection).
        owned: ``async (ids) -> set of ids`` the import still owns, asked under the locks
            (a document deleted meanwhile gets no chunks).

    Returns:
        The documents written.
    """
    if not docs:
        return []
    part = sql.Identifier(partition_name(tenant_id))
    collections = sorted({doc.collection_id for doc in docs})
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock_shared(k) FROM unnest(%s::bigint[]) k",
            ([lock_key(c) for c in collections],),
        )
        # Sorted: two importers (or an importer and a worker) lock shared ids in one order.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) k ORDER BY k",
            (sorted(lock_key(doc.document_id) for doc in docs),),
        )
        mine: set[uuid.UUID] = await owned([doc.document_id for doc in docs])
        keep = [doc for doc in docs if doc.document_id in mine]
        if not keep:
            return []
        await _copy(conn, part, tenant_id, keep)
        added = await _summarise(
            conn,
            sql.SQL(
                "SELECT tsv, tsv_len FROM {} WHERE tenant_id = %s AND document_id = ANY(%s)"
            ).format(part),
            (tenant_id, [doc.document_id for doc in keep]),
        )
        await _apply_text_delta(conn, tenant_id, added)
    return [doc.document_id for doc in keep]


async def build_indexes(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> None:
    """Build on the standalone table every index the parent declares (its keys as constraints,
    which ATTACH requires to adopt them), then ANALYZE it.

    Each index is built in its own statement (autocommit): the table is not attached, so no
    search waits for these builds.
    """
    table = staging_name(tenant_id)
    await conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(BUILD_MEMORY)))
    cur = await conn.execute(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'chunks'::regclass AND contype IN ('p', 'u') ORDER BY conname"
    )
    for (definition,) in await cur.fetchall():
        await conn.execute(
            sql.SQL("ALTER TABLE {} ADD {}").format(sql.Identifier(table), sql.SQL(definition))
        )
    cur = await conn.execute(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " WHERE i.indrelid = 'chunks'::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
        " ORDER BY i.indexrelid"
    )
    for number, (definition,) in enumerate(await cur.fetchall()):
        # "CREATE INDEX name ON ONLY public.chunks USING ..." -> the same on the table.
        _, _, method = str(definition).partition(" USING ")
        await conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING {}").format(
                sql.Identifier(f"{table}_{number}"), sql.Identifier(table), sql.SQL(method)
            )
        )
    await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))


async def attach(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> str:
    """Make the standalone table the tenant's partition, registered, with its statistics, in
    one transaction.

    Returns:
        ``attached``; or ``merged`` when a normal ingestion created the partition and wrote
        chunks meanwhile (the rows are then copied into it: correct, not fast).
    """
    name = partition_name(tenant_id)
    part, table = sql.Identifier(name), sql.Identifier(staging_name(tenant_id))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ensure_lock(tenant_id),))
        how = "attached"
        if await partition_has_chunks(conn, tenant_id):
            how = "merged"
            columns = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
            await conn.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                    part, columns, columns, table
                )
            )
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))
        else:
            # An empty partition (a tenant whose documents were all deleted) gives way.
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(part))
            await conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(table, part))
            await conn.execute(
                sql.SQL("ALTER TABLE chunks ATTACH PARTITION {} FOR VALUES IN ({})").format(
                    part, sql.Literal(str(tenant_id))
                )
            )
        await conn.execute(
            "INSERT INTO tenant_partitions (tenant_id, partition_name) VALUES (%s, %s)"
            " ON CONFLICT (tenant_id) DO NOTHING",
            (tenant_id, name),
        )
        # In the same transaction: the rows and their IDF statistics appear together.
        await recount_text_stats(conn, tenant_id)
    return how


async def drop_unowned(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, keep: Sequence[uuid.UUID]
) -> int:
    """Remove from the standalone table the chunks of documents not in ``keep`` (deleted, or
    taken over, while the import ran); returns how many."""
    cur = await conn.execute(
        sql.SQL("DELETE FROM {} WHERE NOT (document_id = ANY(%s))").format(
            sql.Identifier(staging_name(tenant_id))
        ),
        (list(keep),),
    )
    return cur.rowcount
