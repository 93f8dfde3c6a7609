"""The answer route: ``/v1/tenants/{tenant_id}/answer`` (retrieval, then a grounded answer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends
from sse_starlette import EventSourceResponse

from atrium.auth.dependencies import require
from atrium.auth.permissions import Permission
from atrium.auth.subject import AuthSubject
from atrium.kit.responses import TENANT, errors
from atrium.llm import service as answers
from atrium.llm.schemas import AnswerRequest, AnswerResponse
from atrium.retrieval.context import QueryContext
from atrium.retrieval.endpoints import query_context

# Listed under "search" in the API reference, beside the search it builds on.
router = APIRouter(tags=["search"], responses=TENANT)

#: The caller of ``/answer``: counted against its rate limit with the answer's quota hold.
answerer = require(Permission.answer, rate_limit_in_hold=True)


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
    background: BackgroundTasks,
    subject: Annotated[AuthSubject, Depends(answerer)],
    res: Annotated[QueryContext, Depends(query_context(answerer))],
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
        events = await answers.answer_events(res, subject.tenant_id, body)
        return EventSourceResponse(events, ping=15)
    return await answers.answer(res, subject.tenant_id, body, background)
