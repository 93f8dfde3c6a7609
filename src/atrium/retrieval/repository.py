"""SQL of search, against one tenant's partition of ``chunks``.

Every statement names the tenant's partition directly (``chunks_<tenant hex>``), so the planner
never considers another tenant's rows or indexes (no run-time pruning over hundreds of
partitions, whatever the plan cache does) and keeps ``tenant_id = %s`` as a second guard.
A tenant without a partition (nothing ingested yet) simply has no results.

Round trips are the cost to watch (the SQL itself takes about a millisecond): a search with
the usual candidate list (each pooled connection gets it as its session setting once) runs as
ONE statement in autocommit; one that needs a larger ``hnsw.ef_search`` sends ``BEGIN; SET
LOCAL ...; SELECT; COMMIT`` in one pipeline (one round trip), so pooled connections go back to
the pool as they came. Query vectors travel in
pgvector's binary form.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, errors, sql

from atrium.kit.vectordb import partition_name
from atrium.retrieval.filters import Condition, compile_filters

#: Candidates taken from each ranking before reciprocal rank fusion (hybrid mode).
HYBRID_CANDIDATES_MIN = 40
HYBRID_CANDIDATES_MAX = 200


#: pgvector's default ``hnsw.ef_search``.
DEFAULT_EF_SEARCH = 40
#: The smallest candidate list searches use. Measured on 100,000 chunks (bench/search.py):
#: recall@10 0.90 at 40, 0.96 at 100, 0.965 at 128, 0.97 at 160.
MIN_EF_SEARCH = 128
#: With a filter (collections, metadata, excluded documents) the iterative scan in relaxed
#: order may stop on rows slightly out of order; taking this many times ``top_k`` rows and
#: keeping the nearest ``top_k`` of them lifts recall@10 with a 5% filter from 0.92 to 0.97.
FILTER_OVERFETCH = 4

Vector = npt.NDArray[np.float32]


def ef_search_for(top_k: int) -> int:
    """HNSW candidate list size for ``top_k`` results: at least :data:`MIN_EF_SEARCH`, and
    twice ``top_k`` for large requests (pgvector caps it at 1000)."""
    return max(MIN_EF_SEARCH, min(1000, 2 * top_k))


#: Pooled connections already set up by :func:`_fetch` (weak: the pool owns them).
_READY: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()


async def _fetch(
    conn: AsyncConnection[Any],
    query: sql.Composed,
    params: Sequence[Any],
    ef_search: int = DEFAULT_EF_SEARCH,
) -> list[tuple[Any, ...]]:
    """Run one search statement on a pooled (idle, non-autocommit) connection.

    Raises:
        psycopg.errors.UndefinedTable: the tenant has no partition.
    """
    if conn not in _READY:
        # Once per pooled connection: the vector type, and the usual candidate list as the
        # session's setting, so a typical search is a single statement with no SET at all.
        await register_vector_async(conn)
        await conn.execute(
            sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(int(MIN_EF_SEARCH)))
        )
        await conn.commit()
        _READY.add(conn)
    if ef_search <= MIN_EF_SEARCH:
        # One statement, one round trip: no transaction needed, nothing to reset afterwards.
        await conn.set_autocommit(True)
        try:
            cur = await conn.execute(query, params)
            return await cur.fetchall()
        finally:
            await conn.set_autocommit(False)
    # BEGIN (implicit), SET LOCAL, the query and COMMIT leave in one pipeline: one round trip.
    try:
        async with conn.pipeline():
            await conn.execute(
                sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search)))
            )
            cur = await conn.execute(query, params)
            await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return await cur.fetchall()


@dataclass(frozen=True)
class ChunkRow:
    """A chunk as search returns it."""

    id: uuid.UUID
    document_id: uuid.UUID
    collection_id: uuid.UUID
    ordinal: int
    text: str
    metadata: dict[str, Any]
    distance: float


@dataclass(frozen=True)
class Scope:
    """Which chunks of the tenant's partition a search may return.

    Attributes:
        collection_ids: only these collections (None: every collection).
        exclude_documents: never these documents (being deleted).
        conditions: parsed metadata filters.
    """

    collection_ids: Sequence[uuid.UUID] | None = None
    exclude_documents: Sequence[uuid.UUID] = ()
    conditions: Sequence[Condition] = ()


def _where(tenant_id: uuid.UUID, scope: Scope) -> tuple[sql.Composable, list[Any]]:
    parts: list[sql.Composable] = [sql.SQL("c.tenant_id = %s")]
    params: list[Any] = [tenant_id]
    if scope.collection_ids is not None:
        parts.append(sql.SQL("c.collection_id = ANY(%s::uuid[])"))
        params.append(list(scope.collection_ids))
    if scope.exclude_documents:
        parts.append(sql.SQL("c.document_id <> ALL(%s::uuid[])"))
        params.append(list(scope.exclude_documents))
    fragments, fparams = compile_filters(list(scope.conditions), sql.SQL("c.metadata"))
    parts.extend(fragments)
    params.extend(fparams)
    return sql.SQL(" AND ").join(parts), params


_COLUMNS = sql.SQL("c.id, c.document_id, c.collection_id, c.ordinal, c.text, c.metadata")


def _rows(raw: Sequence[tuple[Any, ...]]) -> list[ChunkRow]:
    return [
        ChunkRow(
            id=r[0],
            document_id=r[1],
            collection_id=r[2],
            ordinal=r[3],
            text=r[4],
            metadata=r[5] or {},
            distance=float(r[6]),
        )
        for r in raw
    ]


async def vector_search(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    vector: Vector,
    *,
    top_k: int,
    scope: Scope,
) -> list[ChunkRow]:
    """The ``top_k`` chunks nearest to ``vector`` (cosine distance), nearest first.

    Args:
        conn: a pooled connection (not in autocommit); the transaction is ended here.
        tenant_id: whose partition to search.
        vector: the query vector (unit length).
        top_k: how many chunks.
        scope: collections, excluded documents and metadata filters.
    """
    where, params = _where(tenant_id, scope)
    # With iterative scans in relaxed order the index may return rows slightly out of order;
    # the materialized CTE plus an outer sort restores exact order (pgvector's advice).
    query = sql.SQL(
        "WITH hits AS MATERIALIZED ("
        " SELECT {cols}, c.embedding <=> %s::vector AS distance FROM {part} c"
        " WHERE {where} ORDER BY distance LIMIT %s"
        ") SELECT * FROM hits ORDER BY distance + 0 LIMIT %s"
    ).format(cols=_COLUMNS, part=sql.Identifier(partition_name(tenant_id)), where=where)
    filtered = bool(scope.collection_ids is not None or scope.exclude_documents or scope.conditions)
    inner = min(1000, FILTER_OVERFETCH * top_k) if filtered else top_k
    try:
        raw = await _fetch(conn, query, [vector, *params, inner, top_k], ef_search_for(top_k))
    except errors.UndefinedTable:
        return []
    return _rows(raw)


async def hybrid_candidates(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    vector: Vector,
    text_query: str,
    *,
    candidates: int,
    scope: Scope,
) -> tuple[list[tuple[uuid.UUID, float]], list[tuple[uuid.UUID, float]]]:
    """Two rankings for fusion: nearest vectors and best full-text matches.

    Full text uses ``websearch_to_tsquery('english', ...)`` (quotes, ``or``, ``-word``) on the
    stored ``tsv`` column and ranks with ``ts_rank_cd`` (cover density).

    Returns:
        ``(vector_ranking, text_ranking)``: ``(chunk id, distance)`` nearest first, and
        ``(chunk id, rank)`` best first.
    """
    where, params = _where(tenant_id, scope)
    part = sql.Identifier(partition_name(tenant_id))
    query = sql.SQL(
        "WITH v AS MATERIALIZED ("
        " SELECT c.id, c.embedding <=> %s::vector AS score FROM {part} c"
        " WHERE {where} ORDER BY score LIMIT %s"
        "), t AS MATERIALIZED ("
        " SELECT c.id, ts_rank_cd(c.tsv, q) AS score"
        " FROM {part} c, websearch_to_tsquery('english', %s) q"
        " WHERE c.tsv @@ q AND {where} ORDER BY score DESC LIMIT %s"
        ") SELECT true, id, score FROM v UNION ALL SELECT false, id, score FROM t"
    ).format(part=part, where=where)
    try:
        raw = await _fetch(
            conn,
            query,
            [vector, *params, candidates, text_query, *params, candidates],
            ef_search_for(candidates),
        )
    except errors.UndefinedTable:
        return [], []
    vec = sorted(((r[1], float(r[2])) for r in raw if r[0]), key=lambda x: x[1])
    txt = sorted(((r[1], float(r[2])) for r in raw if not r[0]), key=lambda x: -x[1])
    return vec, txt


async def fetch_chunks(
    conn: AsyncConnection, tenant_id: uuid.UUID, vector: Vector, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, ChunkRow]:
    """The chunks with ``ids`` (and their distance to ``vector``), by id."""
    if not ids:
        return {}
    query = sql.SQL(
        "SELECT {cols}, c.embedding <=> %s::vector FROM {part} c"
        " WHERE c.tenant_id = %s AND c.id = ANY(%s::uuid[])"
    ).format(cols=_COLUMNS, part=sql.Identifier(partition_name(tenant_id)))
    try:
        raw = await _fetch(conn, query, [vector, tenant_id, list(ids)])
    except errors.UndefinedTable:
        return {}
    return {row.id: row for row in _rows(raw)}
