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
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, errors, sql
from psycopg.types.json import Jsonb

from atrium.kit.vectordb import (
    DEFAULT_LANGUAGE,
    ensure_tenant_partition,
    partition_exists,
    partition_name,
)

_COLUMNS = (
    "tenant_id",
    "lang",
    "id",
    "collection_id",
    "document_id",
    "ordinal",
    "text",
    "token_count",
    "metadata",
    "embedding",
)
_COPY_TYPES = ["uuid", "text", "uuid", "uuid", "uuid", "int4", "text", "int4", "jsonb", "vector"]


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
    language: str = DEFAULT_LANGUAGE,
) -> bool:
    """Replace the document's chunks with these, atomically (BM25 statistics included).

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
        language: the collection's full-text configuration (``kit.vectordb.LANGUAGES``).

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
            language,
        )
    except errors.UndefinedTable:
        # The partition went away since this process last saw it: a purge of the tenant (the
        # run no longer owns the document: re-creating the partition would leave an orphan
        # behind the purge) or a purge and a re-creation (check again once).
        _known_partitions.discard(tenant_id)
        if not await still_owned():
            return False
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
            language,
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
    language: str,
) -> bool:
    meta = Jsonb(metadata)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock_shared(%s), pg_advisory_xact_lock(%s)",
            (lock_key(collection_id), lock_key(document_id)),
        )
        if not await still_owned():
            return False
        old = await _summarise(
            conn,
            _delete(sql.SQL("{} WHERE tenant_id = %s AND document_id = %s").format(part)),
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
                        language,
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
        new = await _summarise(
            conn,
            sql.SQL("SELECT tsv, tsv_len FROM {} WHERE tenant_id = %s AND document_id = %s").format(
                part
            ),
            (tenant_id, document_id),
        )
        await _apply_text_delta(conn, tenant_id, new.minus(old))
    return True


@dataclass
class TextDelta:
    """A change to a tenant's BM25 statistics.

    Attributes:
        df: chunks gained (or, negative, lost) per lexeme.
        chunks: chunks gained or lost.
        length: words (``tsv_len``) gained or lost.
    """

    df: dict[str, int]
    chunks: int
    length: int

    def minus(self, other: TextDelta) -> TextDelta:
        """This change less ``other`` (new chunks less the ones they replace)."""
        df = dict(self.df)
        for lexeme, n in other.df.items():
            df[lexeme] = df.get(lexeme, 0) - n
        return TextDelta(
            {k: v for k, v in df.items() if v},
            self.chunks - other.chunks,
            self.length - other.length,
        )

    def negated(self) -> TextDelta:
        """The opposite change (chunks removed)."""
        return TextDelta({k: -v for k, v in self.df.items()}, -self.chunks, -self.length)


async def _summarise(
    conn: AsyncConnection[Any], source: sql.Composable, params: Sequence[Any]
) -> TextDelta:
    """What the chunks ``source`` yields (``tsv, tsv_len`` rows) hold, as a TextDelta.

    ``source`` may be a ``DELETE ... RETURNING tsv, tsv_len``: one round trip removes the
    chunks and tells what they took from the statistics.
    """
    query = sql.SQL(
        "WITH rows AS ({}),"
        " lex AS (SELECT u.lexeme, count(*)::int AS n FROM rows, unnest(rows.tsv) u"
        " GROUP BY u.lexeme)"
        " SELECT (SELECT count(*) FROM rows), (SELECT coalesce(sum(tsv_len), 0) FROM rows),"
        " (SELECT coalesce(array_agg(lexeme), '{{}}') FROM lex),"
        " (SELECT coalesce(array_agg(n), '{{}}') FROM lex)"
    ).format(source)
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    if row is None:
        return TextDelta({}, 0, 0)
    return TextDelta(dict(zip(row[2], row[3], strict=True)), int(row[0]), int(row[1]))


def _delete(target: str | sql.Composable) -> sql.Composable:
    """``DELETE FROM <target> RETURNING tsv, tsv_len``, a source for :func:`_summarise`."""
    return sql.SQL("DELETE FROM {} RETURNING tsv, tsv_len").format(
        sql.SQL(target) if isinstance(target, str) else target
    )


async def _apply_text_delta(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, delta: TextDelta
) -> None:
    """Add ``delta`` to the tenant's lexicon and totals, inside the caller's transaction.

    Lexemes are upserted in sorted order and before the totals row, in every writer: two
    transactions of the same tenant lock the rows they share in the same order (they wait for
    each other, never deadlock).
    """
    if delta.df:
        lexemes = sorted(delta.df)
        await conn.execute(
            "INSERT INTO lexicon (tenant_id, lexeme, df)"
            " SELECT %s, l, d FROM unnest(%s::text[], %s::int[]) AS x(l, d) ORDER BY l"
            " ON CONFLICT (tenant_id, lexeme) DO UPDATE SET df = lexicon.df + excluded.df",
            (tenant_id, lexemes, [delta.df[k] for k in lexemes]),
        )
    if delta.chunks or delta.length:
        await conn.execute(
            "INSERT INTO text_stats (tenant_id, chunks, total_len) VALUES (%s, %s, %s)"
            " ON CONFLICT (tenant_id) DO UPDATE SET chunks = text_stats.chunks + excluded.chunks,"
            " total_len = text_stats.total_len + excluded.total_len",
            (tenant_id, delta.chunks, delta.length),
        )


async def delete_document_chunks(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, document_id: uuid.UUID
) -> int:
    """Remove a document's chunks; returns how many."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(document_id),))
        gone = await _summarise(
            conn,
            _delete("chunks WHERE tenant_id = %s AND document_id = %s"),
            (tenant_id, document_id),
        )
        await _apply_text_delta(conn, tenant_id, gone.negated())
        return gone.chunks


async def delete_collection_chunks(
    conn: AsyncConnection[Any], tenant_id: uuid.UUID, collection_id: uuid.UUID
) -> int:
    """Remove every chunk of a collection; returns how many."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(collection_id),))
        gone = await _summarise(
            conn,
            _delete("chunks WHERE tenant_id = %s AND collection_id = %s"),
            (tenant_id, collection_id),
        )
        await _apply_text_delta(conn, tenant_id, gone.negated())
        return gone.chunks


async def recount_text_stats(conn: AsyncConnection[Any], tenant_id: uuid.UUID) -> None:
    """Recompute the tenant's BM25 statistics from its chunks (after a bulk load that wrote
    rows without going through :func:`replace_document_chunks`), in one transaction."""
    part = sql.Identifier(partition_name(tenant_id))
    async with conn.transaction():
        await conn.execute("DELETE FROM lexicon WHERE tenant_id = %s", (tenant_id,))
        await conn.execute("DELETE FROM text_stats WHERE tenant_id = %s", (tenant_id,))
        await conn.execute(
            sql.SQL(
                "INSERT INTO lexicon (tenant_id, lexeme, df)"
                " SELECT %s, u.lexeme, count(*) FROM {} c, unnest(c.tsv) u GROUP BY u.lexeme"
            ).format(part),
            (tenant_id,),
        )
        await conn.execute(
            sql.SQL(
                "INSERT INTO text_stats (tenant_id, chunks, total_len)"
                " SELECT %s, count(*), coalesce(sum(tsv_len), 0) FROM {}"
            ).format(part),
            (tenant_id,),
        )
