"""The search route: ``/v1/tenants/{tenant_id}/search`` (answers: :mod:`atrium.llm.endpoints`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Request, Response

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.kit.responses import TENANT, errors
from atrium.retrieval.schemas import SearchRequest, SearchResponse
from atrium.retrieval.service import Resources, metered_search

router = APIRouter(tags=["search"], responses=TENANT)


async def resources(request: Request) -> Resources:
    """The app's pools for retrieval (async: a plain function would run in a thread)."""
    return Resources.of(request.app.state)


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
    request: Request,
    background: BackgroundTasks,
    subject: Annotated[AuthSubject, Depends(require(Permission.search))],
    res: Annotated[Resources, Depends(resources)],
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
        request,
        subject.tenant_id,
        body,
        use_cache=use_cache,
        store=store,
        defer_store=True,
    )
    if outcome.store is not None:
        # Filling the cache is no business of this caller's: after the response.
        background.add_task(outcome.store)
    # Serialised once by pydantic's own JSON encoder: the model is already valid, so FastAPI's
    # response_model pass (validate again, then encode) is skipped; response_model still
    # documents the body.
    return Response(
        outcome.response.model_dump_json(),
        media_type="application/json",
        background=background,
    )
