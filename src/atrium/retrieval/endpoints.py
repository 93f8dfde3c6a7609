"""Search and answer routes: ``/v1/tenants/{tenant_id}/search`` and ``.../answer``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Request, Response
from sse_starlette import EventSourceResponse

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.kit.responses import TENANT, errors
from atrium.llm import service as answers
from atrium.llm.schemas import AnswerRequest, AnswerResponse
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

    `mode=vector` ranks by cosine similarity of embeddings on the tenant's own HNSW index;
    `mode=hybrid` fuses that ranking with PostgreSQL full-text rank by reciprocal rank fusion.
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


@router.post(
    "/tenants/{tenant_id}/answer",
    response_model=AnswerResponse,
    summary="Answer a question from the tenant's documents, with citations",
    responses={
        **errors(402, 502, 504),
        200: {
            "description": "The answer, or with `stream: true` a `text/event-stream`.",
            "content": {"text/event-stream": {}},
        },
    },
)
async def answer_route(
    body: AnswerRequest,
    request: Request,
    background: BackgroundTasks,
    subject: Annotated[AuthSubject, Depends(require(Permission.answer))],
    res: Annotated[Resources, Depends(resources)],
) -> Any:
    """Retrieve the chunks relevant to `query`, then answer from them with numbered citations.

    With an LLM configured the answer is written by it (`mode: generative`), following the
    versioned prompt `answer_v1`; every `[n]` in the answer points to `sources[n-1]`. Without
    one the answer quotes the retrieved sentences most similar to the question
    (`mode: extractive`). With `stream: true` the reply is Server-Sent Events: `retrieval`
    (the sources), `delta` (text pieces), then `done` (answer, citations, token usage) or
    `error`. A provider that fails or times out gives 502 or 504.
    """
    if body.stream:
        events = await answers.answer_events(res, request, subject.tenant_id, body)
        return EventSourceResponse(events, ping=15)
    return await answers.answer(res, request, subject.tenant_id, body, background)
