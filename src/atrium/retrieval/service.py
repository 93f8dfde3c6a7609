"""Search: resolve collections, consult the cache, embed, query the tenant's partition, fuse.

Everything is scoped by the tenant id of the caller's :class:`AuthSubject`; the SQL only ever
names that tenant's partition, so no filter or collection id can reach another tenant's chunks.

:func:`metered_search` is a search as a caller asks for one (the ``/search`` route, the MCP
``search`` tool): held against the plan's quota, settled, observed and logged. Answers hold
their own quota (:mod:`atrium.llm.service`) and call :func:`search` directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from atrium.collections import catalog
from atrium.config import Settings
from atrium.embedding.base import EmbeddingError
from atrium.embedding.query import Vector, cached_query_vector, embed_query
from atrium.kit.cache_versions import TenantVersions, tenant_versions, versions_command
from atrium.kit.errors import BadGateway, GatewayTimeout
from atrium.retrieval import cache, metering, repository, rerank
from atrium.retrieval.context import QueryContext
from atrium.retrieval.filters import Condition, canonical, parse_filters
from atrium.retrieval.metering import Metric
from atrium.retrieval.schemas import (
    SearchMode,
    SearchParams,
    SearchResponse,
    SearchResult,
    SearchTimings,
)

log = structlog.get_logger("atrium.retrieval")

#: Weight of the vector ranking in hybrid fusion (the BM25 ranking has the rest). Chosen by
#: ``bench/quality.py --fusion-sweep``: min-max normalised scores combined 50/50 beat
#: reciprocal rank fusion (k 60) on both labelled sets (news 0.855 vs 0.845, Lee 0.765 vs
#: 0.733 nDCG@10) and beat the better half alone by 0.02 on each; 0.4-0.6 are within 0.005.
HYBRID_VECTOR_WEIGHT = 0.5


@dataclass
class SearchOutcome:
    """A search's response plus what the caller needs afterwards (query vector, log fields)."""

    response: SearchResponse
    query_vector: Vector | None = None
    log_fields: dict[str, Any] = field(default_factory=dict)
    #: With ``defer_store``: queues the cache write (call it once the body is serialised; the
    #: next search's quota round trip sends it).
    store: Callable[[], None] | None = None
    _json: bytes | None = None

    def json(self) -> bytes:
        """The response as JSON, serialised once: the body sent and the body cached."""
        if self._json is None:
            self._json = self.response.model_dump_json().encode()
        return self._json


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _result(row: repository.ChunkRow, score: float, text_score: float | None) -> SearchResult:
    # Chunks carry the document's metadata plus its title (ingestion's contract); the title
    # is returned on its own.
    metadata = dict(row.metadata) if isinstance(row.metadata, dict) else {}
    title = metadata.pop("title", None)
    return SearchResult(
        chunk_id=row.id,
        document_id=row.document_id,
        collection_id=row.collection_id,
        title=title if isinstance(title, str) and title else None,
        ordinal=row.ordinal,
        score=round(score, 6),
        vector_score=None if row.distance is None else round(1.0 - row.distance, 6),
        text_score=None if text_score is None else round(text_score, 6),
        text=row.text,
        metadata=metadata,
    )


def normalised_request(
    params: SearchParams, collection_ids: Sequence[uuid.UUID] | None
) -> dict[str, Any]:
    """The parts of a request that decide its results, in canonical form (for the cache key)."""
    return {
        "q": params.query,
        "k": params.top_k,
        "mode": params.mode.value,
        "min": params.min_score,
        "rr": params.rerank_top_n if params.rerank else 0,
        "f": canonical(parse_filters(params.filters)),
        "all": collection_ids is None,
    }


def _min_max(values: dict[uuid.UUID, float]) -> dict[uuid.UUID, float]:
    if not values:
        return values
    low, high = min(values.values()), max(values.values())
    if high <= low:
        return dict.fromkeys(values, 1.0)
    return {k: (v - low) / (high - low) for k, v in values.items()}


def fuse(
    vector_ranking: Sequence[tuple[uuid.UUID, float]],
    text_ranking: Sequence[tuple[uuid.UUID, float]],
    top_k: int,
) -> list[tuple[uuid.UUID, float, float | None]]:
    """Relative score fusion of the vector and BM25 rankings.

    Each ranking's scores (cosine similarity, BM25) are min-max normalised over its own
    candidates to 0-1, and a chunk's fused score is ``w * vector + (1 - w) * text`` with
    ``w`` = :data:`HYBRID_VECTOR_WEIGHT` (a chunk missing from a ranking scores 0 there).
    Unlike reciprocal rank fusion it keeps how far apart the scores are: a chunk far ahead
    in one ranking stays ahead.

    Args:
        vector_ranking: ``(chunk id, cosine distance)``, nearest first.
        text_ranking: ``(chunk id, BM25)``, best first.
        top_k: how many to keep.

    Returns:
        Up to ``top_k`` ``(chunk id, fused score, BM25 or None)``, best first; the fused
        score is 0-1 (1: first in both rankings).
    """
    vector = _min_max({cid: 1.0 - distance for cid, distance in vector_ranking})
    bm25 = dict(text_ranking)
    text = _min_max(bm25)
    w = HYBRID_VECTOR_WEIGHT
    fused = {cid: w * vector.get(cid, 0.0) + (1 - w) * text.get(cid, 0.0) for cid in vector | text}
    ranked = sorted(fused.items(), key=lambda kv: (-kv[1], str(kv[0])))[:top_k]
    return [(cid, score, bm25.get(cid)) for cid, score in ranked]


async def search(
    res: QueryContext,
    tenant_id: uuid.UUID,
    params: SearchParams,
    *,
    use_cache: bool = True,
    store: bool = True,
    defer_store: bool = False,
    versions: TenantVersions | None = None,
) -> SearchOutcome:
    """Run a search for ``tenant_id``.

    Args:
        res: the query's pools and settings.
        tenant_id: the caller's tenant (from its AuthSubject).
        params: the validated request.
        use_cache: look the request up in the result cache first.
        store: store a fresh result in the cache.
        defer_store: leave that cache write to the caller (``outcome.store``), which queues
            it for the next search's round trip instead of sending it now.
        versions: the tenant's cache versions when the caller already read them (in its
            quota reservation's round trip); None reads them here.

    Raises:
        NotFound: a requested collection is not one of the tenant's.
        BadGateway, GatewayTimeout: a hosted embedding model failed.
    """
    start = time.perf_counter()
    timings = SearchTimings()
    conditions = parse_filters(params.filters)
    if params.rerank:
        rerank.check_rerank(res.settings, params.rerank_top_n)
    # The query is embedded (in a worker thread) while the collections and the cache are
    # looked up: on a cache miss its latency is mostly hidden; on a hit the vector still lands
    # in the query-vector LRU.
    embedding: asyncio.Future[tuple[Vector, bool, float]] | None = None
    if params.mode is not SearchMode.lexical:  # lexical search needs no query vector
        known = cached_query_vector(res.settings, params.query, tenant_id=tenant_id)
        if known is not None:  # no task to schedule for a vector already at hand
            embedding = asyncio.get_running_loop().create_future()
            embedding.set_result((known, True, 0.0))
        else:
            embedding = asyncio.ensure_future(_embed(res.settings, params.query, tenant_id))
    try:
        return await _search(
            res,
            tenant_id,
            params,
            conditions,
            embedding,
            start,
            timings,
            use_cache=use_cache,
            store=store,
            defer_store=defer_store,
            versions=versions,
        )
    finally:
        if embedding is not None:
            embedding.add_done_callback(_discard)


async def metered_search(
    res: QueryContext,
    tenant_id: uuid.UUID,
    params: SearchParams,
    *,
    use_cache: bool = True,
    store: bool = True,
    defer_store: bool = False,
    via: str | None = None,
) -> SearchOutcome:
    """One search of the plan: hold it, search, settle it (or give it back), observe, log.

    What the ``/search`` route and the MCP ``search`` tool both do. The caller's rate limit
    (``res.rate_limit``), the quota hold and the tenant's cache versions are one Redis round
    trip.

    Args:
        res: the query's pools, settings and metering.
        tenant_id: the caller's tenant (from its AuthSubject).
        params: the validated request.
        use_cache: look the request up in the result cache first.
        store: store a fresh result in the cache.
        defer_store: leave that cache write to the caller (``outcome.store``), which queues
            it for the next search's round trip instead of sending it now.
        via: how the search arrived, for the log line when not the HTTP route (``"mcp"``).

    Raises:
        TooManyRequests: the caller's rate limit is spent (429; nothing else was done).
        PaymentRequired: the plan has no searches left (402; nothing else was done).
        NotFound: a requested collection is not one of the tenant's.
        BadGateway, GatewayTimeout: a hosted embedding model failed.
    """
    start = time.perf_counter()
    if params.rerank:  # refused before the plan is charged
        rerank.check_rerank(res.settings, params.rerank_top_n)
    hold = await metering.reserve(
        res,
        tenant_id,
        Metric.searches,
        rate_limit=res.rate_limit,
        alongside=[versions_command(tenant_id)],
        # Earlier searches' result-cache fills ride along (no round trip of their own).
        writes=res.cache_writes.take(),
    )
    try:
        versions = await tenant_versions(res.redis, tenant_id, hold.replies[0])
        outcome = await search(
            res,
            tenant_id,
            params,
            use_cache=use_cache,
            store=store,
            defer_store=defer_store,
            versions=versions,
        )
    except BaseException:
        # Nothing was searched: the plan gets its search back.
        await metering.release(hold)
        raise
    await metering.settle(hold)
    response = outcome.response
    t = response.timings
    metering.observe(
        embedding_ms=t.embedding_ms,
        search_ms=t.search_ms,
        fusion_ms=t.fusion_ms,
        rerank_ms=t.rerank_ms,
        hybrid=response.mode is not SearchMode.vector,
    )
    fields = log_fields(response)
    if via is not None:
        fields["via"] = via
    log.info(
        "query",
        kind="search",
        tenant_id=str(tenant_id),
        top_k=params.top_k,
        filtered=bool(params.filters),
        **fields,
        total_ms=_ms(start),
    )
    return outcome


def _discard(task: asyncio.Future[Any]) -> None:
    # Retrieve the outcome so an unused failure is not reported as "never retrieved".
    if not task.cancelled():
        task.exception()


async def _embed(settings: Settings, text: str, tenant_id: uuid.UUID) -> tuple[Vector, bool, float]:
    t = time.perf_counter()
    vec, cached = await embed_query(settings, text, tenant_id=tenant_id)
    return vec, cached, _ms(t)


async def _search(
    res: QueryContext,
    tenant_id: uuid.UUID,
    params: SearchParams,
    conditions: list[Condition],
    embedding: asyncio.Future[tuple[Vector, bool, float]] | None,
    start: float,
    timings: SearchTimings,
    *,
    use_cache: bool,
    store: bool,
    defer_store: bool,
    versions: TenantVersions | None,
) -> SearchOutcome:
    t = time.perf_counter()
    current = versions or await tenant_versions(res.redis, tenant_id)
    timings.cache_ms = _ms(t)
    wanted = await catalog.resolve(res.engine, tenant_id, params.collection_ids, current.catalog)
    model = f"{res.settings.embedding_provider}:{res.settings.embedding_model}"

    key = None
    if use_cache or store:
        t = time.perf_counter()
        ids = wanted.ids
        request = normalised_request(params, wanted.restrict)
        request["x"] = [str(d) for d in wanted.exclude_documents]
        key = cache.cache_key(tenant_id, request, ids, current.of(ids), model)
        timings.cache_ms += _ms(t)
        if use_cache:
            body = await cache.get(key)
            timings.cache_ms += _ms(t)
            if body is not None:
                response = SearchResponse.model_validate_json(body)
                response.cache_hit = True
                timings.total_ms = _ms(start)
                response.timings = timings
                return SearchOutcome(response, None, {"cache_hit": True})

    if not wanted.ids:
        # A tenant without collections (or a request naming none) has nothing to search.
        timings.total_ms = _ms(start)
        response = SearchResponse(results=[], mode=params.mode, timings=timings)
        return SearchOutcome(response, None, {"cache_hit": False})

    scope = repository.Scope(wanted.restrict, wanted.exclude_documents, conditions)
    # With reranking, the mode retrieves the candidates and the rerank model keeps top_k.
    top_k = max(params.top_k, params.rerank_top_n) if params.rerank else params.top_k
    results: list[SearchResult]
    qvec: Vector | None = None
    vec_cached = False
    if embedding is None:  # lexical: words only
        t = time.perf_counter()
        async with res.vector_pool.connection() as conn:
            hits = await repository.lexical_search(
                conn, tenant_id, params.query, wanted.languages, top_k=top_k, scope=scope
            )
        timings.search_ms = _ms(t)
        results = [_result(h.row, h.score, h.bm25) for h in hits]
    else:
        try:
            qvec, vec_cached, timings.embedding_ms = await embedding
        except EmbeddingError as exc:
            if exc.transient:
                raise GatewayTimeout(f"The embedding model did not answer: {exc}") from exc
            raise BadGateway(f"The embedding model failed: {exc}") from exc
        t = time.perf_counter()
        async with res.vector_pool.connection() as conn:
            if params.mode is SearchMode.vector:
                rows = await repository.vector_search(
                    conn, tenant_id, qvec, top_k=top_k, scope=scope
                )
                timings.search_ms = _ms(t)
                results = [_result(r, 1.0 - (r.distance or 0.0), None) for r in rows]
            else:
                n = max(
                    repository.HYBRID_CANDIDATES_MIN,
                    min(repository.HYBRID_CANDIDATES_MAX, 4 * top_k),
                )
                vrank, trank = await repository.hybrid_candidates(
                    conn,
                    tenant_id,
                    qvec,
                    params.query,
                    wanted.languages,
                    candidates=n,
                    scope=scope,
                )
                search_ms = _ms(t)
                t = time.perf_counter()
                fused = fuse(vrank, trank, top_k)
                timings.fusion_ms = _ms(t)
                t = time.perf_counter()
                ids = [f[0] for f in fused]
                by_id = await repository.fetch_chunks(conn, tenant_id, qvec, ids)
                timings.search_ms = round(search_ms + _ms(t), 3)
                results = [
                    _result(by_id[cid], score, ts) for cid, score, ts in fused if cid in by_id
                ]
    if params.rerank:
        results = await _rerank(res.settings, params, results, timings)
    if params.min_score is not None:
        results = [r for r in results if r.score >= params.min_score]
    timings.total_ms = _ms(start)
    response = SearchResponse(results=results, mode=params.mode, timings=timings)
    outcome = SearchOutcome(response, qvec, {"cache_hit": False, "query_vector_cached": vec_cached})
    if store and key is not None and res.settings.search_cache_ttl_seconds > 0:
        cache_key, ttl = key, res.settings.search_cache_ttl_seconds

        if defer_store:

            def queue() -> None:
                res.cache_writes.add(cache_key, outcome.json(), ttl)

            outcome.store = queue
        else:
            await cache.put(cache_key, outcome.json(), ttl)
    return outcome


async def _rerank(
    settings: Settings, params: SearchParams, results: list[SearchResult], timings: SearchTimings
) -> list[SearchResult]:
    """The best ``top_k`` of ``results`` by the rerank model; ``score`` becomes its score."""
    t = time.perf_counter()
    reranked = await rerank.rerank(
        settings, params.query, [r.text for r in results], min(params.top_k, len(results))
    )
    timings.rerank_ms = _ms(t)
    out = []
    for index, relevance in reranked.ranking:
        score = round(relevance, 6)
        out.append(results[index].model_copy(update={"score": score, "rerank_score": score}))
    return out


def log_fields(response: SearchResponse) -> dict[str, Any]:
    """The stage timings of a search, for the one log line of the request."""
    t = response.timings
    return {
        "mode": response.mode.value,
        "results": len(response.results),
        "cache_hit": response.cache_hit,
        "embedding_ms": t.embedding_ms,
        "search_ms": t.search_ms,
        "fusion_ms": t.fusion_ms,
        "rerank_ms": t.rerank_ms,
        "cache_ms": t.cache_ms,
    }
