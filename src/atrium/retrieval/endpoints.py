"""The search route: ``/v1/tenants/{tenant_id}/search`` (answers: :mod:`atrium.llm.endpoints`)."""

# No ``from __future__ import annotations`` here: query_context's dependency is built in a
# closure, and FastAPI can only evaluate a string annotation against the module's globals,
# where ``caller`` is not.

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.billing.quota import Quota
from atrium.billing.service import caller_bucket
from atrium.kit.ratelimit import request_states
from atrium.kit.responses import TENANT, errors
from atrium.retrieval.context import QueryContext
from atrium.retrieval.schemas import SearchRequest, SearchResponse
from atrium.retrieval.service import metered_search

router = APIRouter(tags=["search"], responses=TENANT)


def query_context(caller: require) -> Callable[..., Awaitable[QueryContext]]:
    """Dependency factory: the :class:`QueryContext` of a metered route whose caller ``caller``
    resolves (the same ``require`` object as the route's subject, so FastAPI resolves it once).

    ``caller`` must leave the rate limit to the hold (``rate_limit_in_hold=True``): the
    context carries the caller's bucket, which the route's first quota hold counts.
    """
    if not caller.rate_limit_in_hold:
        raise ValueError("query_context() is for a require(..., rate_limit_in_hold=True)")

    async def dependency(
        request: Request, subject: Annotated[AuthSubject, Depends(caller)]
    ) -> QueryContext:
        quota = Quota.of(request)
        return QueryContext.of(
            request.app,
            rate_limit=await caller_bucket(quota, subject),
            rate_limits=request_states(request),
        )

    return dependency


#: The caller of ``/search``: counted against its rate limit with the search's quota hold.
searcher = require(Permission.search, rate_limit_in_hold=True)


def _cache_flags(cache_control: str | None) -> tuple[bool, bool]:
    """``(use_cache, store)`` from a request's Cache-Control header."""
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    if "no-store" in directives:
        return False, False
    if "no-cache" in directives:
        return False, True
    return True, True


@router.post(
    "/tenants/{tenant_id}/search",
    response_model=SearchResponse,
    summary="Search the tenant's documents",
    responses=errors(402, 502, 504),
)
async def search_route(
    body: SearchRequest,
    subject: Annotated[AuthSubject, Depends(searcher)],
    res: Annotated[QueryContext, Depends(query_context(searcher))],
    cache_control: Annotated[str | None, Header()] = None,
) -> Response:
    """Find the chunks most relevant to `query` in the tenant's collections.

    `mode=hybrid` (the default) combines the min-max normalised scores of the vector and the
    BM25 ranking; `mode=vector` ranks by cosine similarity of embeddings on the tenant's own
    HNSW index; `mode=lexical` by BM25 over the words (any may match, `-word` excludes), in
    each collection's language. `rerank` rescores the candidates with the rerank model.
    `filters` restrict results by document metadata (equals, `$in`, ranges, `$exists`); with
    filters or a collection subset, iterative index scans still return `top_k` results.
    Results are cached until a collection involved changes; send `Cache-Control: no-cache`
    to bypass the cache (or `no-store` to neither read nor fill it). The response reports the
    milliseconds spent embedding, searching and fusing.
    """
    use_cache, store = _cache_flags(cache_control)
    outcome = await metered_search(
        res,
        subject.tenant_id,
        body,
        use_cache=use_cache,
        store=store,
        defer_store=True,
    )
    # Serialised once by pydantic's own JSON encoder, and the cache stores those very bytes:
    # the model is already valid, so FastAPI's response_model pass (validate again, then
    # encode) is skipped; response_model still documents the body.
    response = Response(outcome.json(), media_type="application/json")
    if outcome.store is not None:
        # Queued, not sent: the next search's quota round trip carries the cache fill.
        outcome.store()
    return response
