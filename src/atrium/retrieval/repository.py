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

import re
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

#: Candidates taken from each ranking before fusion (hybrid mode).
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
    #: Cosine distance to the query vector (None in lexical search, which embeds nothing).
    distance: float | None


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
            distance=None if r[6] is None else float(r[6]),
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


#: BM25's term-frequency saturation and length normalisation (the usual values).
BM25_K1 = 1.2
BM25_B = 0.75
#: How many chunks lexical search scores at most, roughly: the query's words are taken rarest
#: first while the chunks holding the rarer ones number fewer than this; the commoner words
#: left over still score, but do not make a chunk a candidate by themselves. Exact BM25 while
#: the query's words are rare enough (always on small tenants); on 100,000 chunks a title's
#: common words otherwise made 20,000+ candidates and a 150 ms search, for chunks that rank
#: below those holding a rarer word (MaxScore's "non-essential" terms).
CANDIDATE_BUDGET = 1000
#: ... and when even the rarest word of the query is that common, the chunks scored are cut at
#: this many (in the index's order): a query of common words only costs a bounded time, at
#: the price of exactness where no word of it singles anything out.
CANDIDATE_CAP = 4 * CANDIDATE_BUDGET

# A lexeme as a tsquery operand: quoted, with quotes doubled and backslashes escaped.
_TSQUERY_OPERAND = r"'''' || replace(replace(w.lexeme, '\', '\\'), '''', '''''') || ''''"


def _lexical_ctes(part: sql.Identifier, where: sql.Composable) -> sql.Composed:
    """The CTEs of a BM25 ranking, ending in ``lx(id, score, top)`` best first.

    Parameters, in order: :func:`_query_params` (the query, the languages), the tenant id
    (twice), the scope's parameters, how many rows.

    * ``qs``: the query's lexemes in each language of the searched collections (the same
      analysis as the chunks: ``atrium_tsv``);
    * ``st``/``w``: the tenant's chunk count and mean length, and each query lexeme's IDF
      (``ln(1 + (N - df + 0.5) / (df + 0.5))``) from the lexicon;
    * ``qs.must``: the words the query excludes (``-word``), which no candidate may hold (NULL
      when it excludes none). Quotes are not a requirement: text pasted as a query often
      quotes, and a phrase that must appear would leave it with nothing;
    * ``qm``: an OR of the query's lexemes for the GIN index (any of them may match), leaving
      out the commonest once the rarer ones cover :data:`CANDIDATE_BUDGET` chunks;
    * ``lx``: BM25 of each candidate. ``setweight`` + ``ts_filter`` cut the chunk's tsvector
      down to the query's lexemes in C before it is unnested, so a candidate costs a few rows,
      not one per word of the chunk. ``top`` is the largest score any chunk could reach (every
      term, high frequency): the 0-1 ``score`` of lexical mode is ``score / top``.
    """
    k1, b = sql.Literal(BM25_K1), sql.Literal(BM25_B)
    return sql.SQL(
        "qs AS MATERIALIZED ("
        " SELECT l.cfg, tsvector_to_array(atrium_tsv(l.cfg, %s)) AS lexemes,"
        " (SELECT CASE WHEN numnode(x) > 0 THEN x END"
        "  FROM websearch_to_tsquery(l.cfg::regconfig, %s) x) AS must"
        " FROM unnest(%s::text[]) AS l(cfg)"
        "), st AS MATERIALIZED ("
        " SELECT greatest(s.chunks, 1)::float8 AS n,"
        " greatest(s.total_len, 1)::float8 / greatest(s.chunks, 1) AS avgdl"
        " FROM text_stats s WHERE s.tenant_id = %s"
        "), w AS MATERIALIZED ("
        " SELECT x.lexeme, x.df, ln(1 + (st.n - x.df + 0.5) / (x.df + 0.5)) AS idf,"
        " row_number() OVER (ORDER BY x.df, x.lexeme) > 1"
        " AND sum(x.df) OVER (ORDER BY x.df, x.lexeme) > {budget} AS common"
        " FROM st, lexicon x WHERE x.tenant_id = %s AND x.df > 0"
        " AND x.lexeme IN (SELECT unnest(qs.lexemes) FROM qs)"
        "), qm AS MATERIALIZED ("
        " SELECT qs.cfg, qs.lexemes, qs.must, ("
        "  SELECT string_agg({operand}, ' | ')::tsquery FROM w WHERE w.lexeme = ANY(qs.lexemes)"
        "  AND NOT w.common"
        " ) AS orq FROM qs"
        "), cand AS MATERIALIZED ("
        " SELECT c.id, c.tsv, c.tsv_len, qm.lexemes"
        " FROM qm JOIN {part} c ON c.lang = qm.cfg AND c.tsv @@ qm.orq"
        " WHERE (qm.must IS NULL OR c.tsv @@ qm.must) AND {where} LIMIT {cap}"
        "), lx AS MATERIALIZED ("
        " SELECT c.id, sum(w.idf * u.tf * ({k1} + 1)"
        "  / (u.tf + {k1} * (1 - {b} + {b} * c.tsv_len / st.avgdl))) AS score,"
        " (SELECT sum(w.idf) * ({k1} + 1) FROM w) AS top"
        " FROM cand c CROSS JOIN st CROSS JOIN LATERAL ("
        "  SELECT t.lexeme, coalesce(cardinality(t.positions), 1) AS tf"
        "  FROM unnest(ts_filter(setweight(c.tsv, 'A', c.lexemes), '{{a}}')) t) u"
        " JOIN w ON w.lexeme = u.lexeme"
        " GROUP BY c.id ORDER BY score DESC, c.id LIMIT %s"
        ")"
    ).format(
        budget=sql.Literal(CANDIDATE_BUDGET),
        cap=sql.Literal(CANDIDATE_CAP),
        operand=sql.SQL(_TSQUERY_OPERAND),
        k1=k1,
        b=b,
        part=part,
        where=where,
    )


#: A word the query excludes: "-word" at the start or after a space (not "well-known").
_EXCLUDED = re.compile(r"(?:^|(?<=\s))-(\w[\w'.]*)")


def _query_params(text_query: str, languages: Sequence[str]) -> list[Any]:
    """The query's words to score, the ones it excludes (as ``-a -b``), its languages."""
    excluded = _EXCLUDED.findall(text_query)
    wanted = _EXCLUDED.sub(" ", text_query)
    return [wanted, " ".join(f"-{w}" for w in excluded), list(languages)]


@dataclass(frozen=True)
class LexicalHit:
    """A chunk as lexical search returns it: BM25 and its 0-1 share of the best possible."""

    row: ChunkRow
    bm25: float
    score: float


async def lexical_search(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    text_query: str,
    languages: Sequence[str],
    *,
    top_k: int,
    scope: Scope,
) -> list[LexicalHit]:
    """The ``top_k`` chunks that best match ``text_query`` by BM25, best first.

    Any term of the query may match; rare terms (in the tenant's statistics) weigh more, and
    long chunks are normalised to the tenant's mean length.

    Args:
        conn: a pooled connection (not in autocommit).
        tenant_id: whose partition to search.
        text_query: the user's query, analysed like the chunks in each of ``languages``.
        languages: the full-text languages of the searched collections.
        top_k: how many chunks.
        scope: collections, excluded documents and metadata filters.
    """
    if not languages:
        return []
    where, params = _where(tenant_id, scope)
    part = sql.Identifier(partition_name(tenant_id))
    query = sql.SQL(
        "WITH {ctes} SELECT {cols}, NULL, lx.score, lx.top FROM lx JOIN {part} c"
        " ON c.tenant_id = %s AND c.id = lx.id ORDER BY lx.score DESC, lx.id"
    ).format(ctes=_lexical_ctes(part, where), cols=_COLUMNS, part=part)
    args = [*_query_params(text_query, languages), tenant_id, tenant_id, *params, top_k, tenant_id]
    try:
        raw = await _fetch(conn, query, args)
    except errors.UndefinedTable:
        return []
    return [
        LexicalHit(row, float(r[7] or 0.0), float(r[7] or 0.0) / float(r[8]) if r[8] else 0.0)
        for row, r in zip(_rows(raw), raw, strict=True)
    ]


async def hybrid_candidates(
    conn: AsyncConnection,
    tenant_id: uuid.UUID,
    vector: Vector,
    text_query: str,
    languages: Sequence[str],
    *,
    candidates: int,
    scope: Scope,
) -> tuple[list[tuple[uuid.UUID, float]], list[tuple[uuid.UUID, float]]]:
    """Two rankings for fusion, in one statement: nearest vectors and best BM25 matches.

    Returns:
        ``(vector_ranking, text_ranking)``: ``(chunk id, distance)`` nearest first, and
        ``(chunk id, BM25)`` best first.
    """
    where, params = _where(tenant_id, scope)
    part = sql.Identifier(partition_name(tenant_id))
    query = sql.SQL(
        "WITH v AS MATERIALIZED ("
        " SELECT c.id, c.embedding <=> %s::vector AS score FROM {part} c"
        " WHERE {where} ORDER BY score LIMIT %s"
        "), {ctes}"
        " SELECT true, id, score FROM v UNION ALL SELECT false, id, score FROM lx"
    ).format(part=part, where=where, ctes=_lexical_ctes(part, where))
    args = [vector, *params, candidates]
    args += [*_query_params(text_query, languages), tenant_id, tenant_id, *params, candidates]
    try:
        raw = await _fetch(conn, query, args, ef_search_for(candidates))
    except errors.UndefinedTable:
        return [], []
    vec = sorted(((r[1], float(r[2])) for r in raw if r[0]), key=lambda x: x[1])
    txt = sorted(((r[1], float(r[2] or 0.0)) for r in raw if not r[0]), key=lambda x: -x[1])
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
