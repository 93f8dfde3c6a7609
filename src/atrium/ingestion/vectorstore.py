"""Writing and removing chunks in the tenant's partition of the vector database.

A document's chunks are replaced in ONE transaction: delete the old ones, COPY the new ones
(binary format, pgvector's adapter for the vectors). Re-running it leaves exactly one set.

Concurrent writers and deleters are serialised with transaction-level advisory locks:

* writing a document takes its collection's lock *shared* and the document's lock exclusive,
  then asks (``still_owned``) whether the run may still write, all before touching a row;
* deleting a document takes the document's lock; deleting a collection takes the collection's
  lock exclusive.

Deleters first commit the ``deleting`` state in the account database, then take their lock. So
a writer either commits before the deleter's DELETE starts (which then removes its rows) or
takes its lock after, sees ``deleting`` and writes nothing: no chunk survives a deletion.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, errors, sql
from psycopg.types.json import Jsonb

from atrium.kit.vectordb import ensure_tenant_partition, partition_exists, partition_name

_COLUMNS = (
    "tenant_id",
    "id",
    "collection_id",
    "document_id",
    "ordinal",
    "text",
    "token_count",
    "metadata",
    "embedding",
)
_COPY_TYPES = ["uuid", "uuid", "uuid", "uuid", "int4", "text", "int4", "jsonb", "vector"]


def lock_key(value: uuid.UUID) -> int:
    """A bigint advisory-lock key for a document or collection id."""
    return int.from_bytes(value.bytes[:8], "big", signed=True)


#: Tenants whose partition this process has seen (checked once per process, not per write).
_known_partitions: set[uuid.UUID] = set()


async def _prepare(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> sql.Identifier:
    """Register pgvector's types on the connection (once) and make sure the partition exists.

    Leaves the connection idle (no open transaction), so the caller's ``transaction()`` is a
    real transaction and not a savepoint inside one the pool would roll back.
    """
    if conn.adapters.types.get("vector") is None:
        await register_vector_async(conn)
        await conn.rollback()
    # Partitions are created lazily, by a tenant's first write (creating a tenant costs no
    # PostgreSQL table); ensure_tenant_partition is idempotent and safe when several workers
    # ingest the tenant's first documents at once.
    if tenant_id not in _known_partitions:
        if not await partition_exists(conn, tenant_id):
            await conn.rollback()
            await ensure_tenant_partition(conn, tenant_id)
        await conn.rollback()
        _known_partitions.add(tenant_id)
    return sql.Identifier(partition_name(tenant_id))


async def replace_document_chunks(
    conn: AsyncConnection[Any],
    *,
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    document_id: uuid.UUID,
    texts: Sequence[str],
    token_counts: Sequence[int],
    embeddings: npt.NDArray[np.float32],
    metadata: dict[str, Any],
    still_owned: Callable[[], Awaitable[bool]],
) -> bool:
    """Replace the document's chunks with these, atomically.

    Args:
        conn: a pooled connection, idle.
        tenant_id: the owner; rows go to its partition.
        collection_id: the document's collection.
        document_id: the document.
        texts: chunk texts in order (ordinal = position).
        token_counts: tokens per chunk.
        embeddings: one row per chunk.
        metadata: stored on every chunk (search filters read it).
        still_owned: asked under the locks; False aborts without writing.

    Returns:
        Whether the chunks were written.
    """
    if not (len(texts) == len(token_counts) == len(embeddings)):
        raise ValueError("texts, token_counts and embeddings must have the same length")
    part = await _prepare(conn, tenant_id)
    try:
        return await _replace(
            conn,
            part,
            tenant_id,
            collection_id,
            document_id,
            texts,
            token_counts,
            embeddings,
            metadata,
            still_owned,
        )
    except errors.UndefinedTable:
        # The partition went away since this process last saw it (a purge and a re-creation):
        # check again once.
        _known_partitions.discard(tenant_id)
        part = await _prepare(conn, tenant_id)
        return await _replace(
            conn,
            part,
            tenant_id,
            collection_id,
            document_id,
            texts,
            token_counts,
            embeddings,
            metadata,
            still_owned,
        )


async def _replace(
    conn: AsyncConnection[Any],
    part: sql.Identifier,
    tenant_id: uuid.UUID,
    collection_id: uuid.UUID,
    document_id: uuid.UUID,
    texts: Sequence[str],
    token_counts: Sequence[int],
    embeddings: npt.NDArray[np.float32],
    metadata: dict[str, Any],
    still_owned: Callable[[], Awaitable[bool]],
) -> bool:
    meta = Jsonb(metadata)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock_shared(%s), pg_advisory_xact_lock(%s)",
            (lock_key(collection_id), lock_key(document_id)),
        )
        if not await still_owned():
            return False
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND document_id = %s").format(part),
            (tenant_id, document_id),
        )
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(
            part, sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        )
        async with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            copy.set_types(_COPY_TYPES)
            for ordinal, (text, tokens) in enumerate(zip(texts, token_counts, strict=True)):
                await copy.write_row(
                    (
                        tenant_id,
                        uuid.uuid4(),
                        collection_id,
                        document_id,
                        ordinal,
                        text,
                        int(tokens),
                        meta,
                        embeddings[ordinal],
                    )
                )
    return True


async def delete_document_chunks(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, document_id: uuid.UUID
) -> int:
    """Remove a document's chunks; returns how many."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(document_id),))
        cur = await conn.execute(
            "DELETE FROM chunks WHERE tenant_id = %s AND document_id = %s",
            (tenant_id, document_id),
        )
        return cur.rowcount


async def delete_collection_chunks(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, collection_id: uuid.UUID
) -> int:
    """Remove every chunk of a collection; returns how many."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(collection_id),))
        cur = await conn.execute(
            "DELETE FROM chunks WHERE tenant_id = %s AND collection_id = %s",
            (tenant_id, collection_id),
        )
        return cur.rowcount
