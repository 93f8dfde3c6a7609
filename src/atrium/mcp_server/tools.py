"""The MCP tools: search, answer, list_collections and get_document, on the key's tenant.

Each tool calls the services behind the matching HTTP route (quota holds and metering, the
search cache, tenant-scoped repositories), never the app over HTTP. Failures a caller can act
on (a missing scope, a plan limit, an unknown collection or document, a bad filter) come back
as tool errors (``isError``) carrying the message and the ``{"error", "detail"}`` body the
route would have answered, so a model reads why and what to change; none becomes a 500.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import BackgroundTasks, Request
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from atrium.auth.permissions import SCOPE_PERMISSIONS, Permission
from atrium.auth.subject import AuthSubject
from atrium.collections import service as collections
from atrium.collections.schemas import Collection
from atrium.ingestion import service as documents
from atrium.ingestion.schemas import Document
from atrium.kit.db import unit_of_work
from atrium.kit.errors import (
    AtriumError,
    Forbidden,
    Unprocessable,
    internal_error,
    outage_error,
    outage_of,
)
from atrium.kit.pagination import MAX_PAGE, Params
from atrium.kit.ratelimit import request_states
from atrium.llm import service as answers
from atrium.llm.schemas import AnswerRequest, AnswerResponse
from atrium.retrieval.context import QueryContext
from atrium.retrieval.schemas import (
    MAX_COLLECTIONS,
    MAX_QUERY_CHARS,
    SearchMode,
    SearchRequest,
)
from atrium.retrieval.service import metered_search

log = structlog.get_logger("atrium.mcp")

#: The one permission each tool needs (the API-key scopes that grant it are in
#: auth/permissions.py); tests/auth/test_authz_matrix.py calls every tool listed here.
TOOL_PERMISSIONS: dict[str, Permission] = {
    "search": Permission.search,
    "answer": Permission.answer,
    "list_collections": Permission.collections_read,
    "get_document": Permission.documents_read,
}

# Every tool only reads: searches and answers use quota but change no data.
_READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)


# --- Structured results ----------------------------------------------------------------------


class Chunk(BaseModel):
    """A retrieved chunk, numbered so an answer can cite it as [n]."""

    number: int = Field(..., description="Cite this chunk as [number].")
    chunk_id: uuid.UUID
    document_id: uuid.UUID = Field(..., description="Pass it to get_document for the record.")
    collection_id: uuid.UUID
    title: str | None = Field(None, description="The document's title, when it has one.")
    ordinal: int = Field(..., description="Position of the chunk within its document.")
    score: float = Field(
        ..., description="Cosine similarity (vector), 0-1 BM25 (lexical) or fused score (hybrid)."
    )
    text: str
    metadata: dict[str, Any] = Field(..., description="The document's metadata.")


class SearchOutput(BaseModel):
    """The chunks most relevant to the query, best first."""

    query: str
    mode: SearchMode
    results: list[Chunk]
    cache_hit: bool = Field(False, description="Whether the results came from the cache.")


class CollectionsOutput(BaseModel):
    """One page of the tenant's collections, by name."""

    collections: list[Collection]
    total: int = Field(..., description="Collections in the tenant.")
    page: int
    pages: int


# --- Plumbing ----------------------------------------------------------------------------------


def _request(ctx: Context[Any, Any]) -> Request:
    request = ctx.request_context.request
    if not isinstance(request, Request):  # only the HTTP transport is mounted
        raise RuntimeError("Atrium's MCP tools run over streamable HTTP only")
    return request


def _missing_permission(permission: Permission) -> Forbidden:
    scopes = [s.value for s, granted in SCOPE_PERMISSIONS.items() if permission in granted]
    message = (
        f"Missing permission '{permission.value}': this API key needs the "
        f"{' or '.join(repr(s) for s in scopes)} scope; create a key that has it"
    )
    return Forbidden(
        message,
        detail={
            "message": message,
            "missing_permission": permission.value,
            "missing_scopes": scopes,
        },
    )


def _error(exc: AtriumError) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=exc.message)],
        structured_content={"error": exc.name, "detail": exc.detail, "status": exc.status_code},
        is_error=True,
    )


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], **arguments: Any) -> M:
    """The route's request model built from a tool's arguments.

    The SDK has already checked types and ranges against the tool's input schema; the model
    adds what a schema cannot say (a query of only spaces, an unknown filter operator).

    Raises:
        Unprocessable: in the words the HTTP 422 uses, naming each argument.
    """
    try:
        return model(**arguments)
    except ValidationError as exc:
        problems = [
            {
                "loc": [str(p) for p in err.get("loc", ())],
                "msg": str(err.get("msg", "")).removeprefix("Value error, "),
            }
            for err in exc.errors()
        ]
        text = "; ".join(f"{'.'.join(p['loc']) or 'arguments'}: {p['msg']}" for p in problems)
        raise Unprocessable(f"Invalid arguments: {text}", detail=problems) from None


async def _call(
    ctx: Context[Any, Any],
    tool: str,
    run: Callable[[Request, AuthSubject], Awaitable[CallToolResult]],
) -> CallToolResult:
    """Check the tool's permission, run it, and turn every failure into a tool error."""
    request = _request(ctx)
    # Set by the /mcp gate (mcp_server.auth.authenticate) before any MCP handling.
    subject: AuthSubject = request.state.subject
    permission = TOOL_PERMISSIONS[tool]
    if not subject.can(permission):
        return _error(_missing_permission(permission))
    try:
        return await run(request, subject)
    except AtriumError as exc:
        return _error(exc)
    except Exception as exc:
        # What the app's handlers answer on a route (kit/errors.py), as a tool error.
        component = outage_of(exc)
        rid = str(getattr(request.state, "request_id", ""))
        if component is not None:
            log.warning("dependency_unavailable", tool=tool, component=component, request_id=rid)
            return _error(outage_error(component))
        # Never a stack trace to the client: log it with the request id and hand that over.
        log.exception("mcp_tool_failed", tool=tool, request_id=rid)
        return _error(internal_error(rid))


def _chunk_text(chunks: list[Chunk]) -> str:
    lines = []
    for c in chunks:
        title = c.title or "(untitled)"
        lines.append(
            f"[{c.number}] {title} (document {c.document_id}, collection {c.collection_id}, "
            f"chunk {c.ordinal}, score {c.score:.3f})\n{c.text}"
        )
    return "\n\n".join(lines)


# --- The tools --------------------------------------------------------------------------------

Query = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="The question or search text, in natural language.",
    ),
]
CollectionIds = Annotated[
    list[uuid.UUID] | None,
    Field(
        max_length=MAX_COLLECTIONS,
        description="Collections to search (ids from list_collections); omit for all of them.",
    ),
]
Filters = Annotated[
    dict[str, Any] | None,
    Field(
        description=(
            "Conditions on document metadata, all of which must hold: "
            '{"lang": "en"} (equals), {"tags": {"$in": ["a", "b"]}} (in), '
            '{"year": {"$gte": 2020, "$lt": 2025}} (range), {"draft": {"$exists": false}}.'
        )
    ),
]
Mode = Annotated[
    SearchMode,
    Field(
        description=(
            "'vector' (semantic), 'lexical' (BM25 keywords: names, codes, rare terms) or "
            "'hybrid' (both, fused)."
        )
    ),
]


async def _search(request: Request, subject: AuthSubject, params: SearchRequest) -> CallToolResult:
    # The /search route's own steps (quota hold, cache, search, settle, metrics, log line); the
    # cache is filled before the result goes back, since a tool result is the response.
    # The rate limit was counted for the MCP message (mcp_server.auth): the hold only holds.
    ctx = QueryContext.of(request.app, rate_limits=request_states(request))
    outcome = await metered_search(ctx, subject.tenant_id, params, via="mcp")
    response = outcome.response
    chunks = [
        Chunk(number=n, **r.model_dump(include=set(Chunk.model_fields) - {"number"}))
        for n, r in enumerate(response.results, start=1)
    ]
    out = SearchOutput(
        query=params.query, mode=response.mode, results=chunks, cache_hit=response.cache_hit
    )
    text = (
        f"{len(chunks)} chunk(s) for {params.query!r}, best first:\n\n{_chunk_text(chunks)}"
        if chunks
        else f"No chunk matched {params.query!r}."
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=out.model_dump(mode="json"),
    )


async def _answer(request: Request, subject: AuthSubject, params: AnswerRequest) -> CallToolResult:
    # The non-streamed POST .../answer: one answer (and its LLM tokens) metered, settled
    # here rather than after a response, since a tool result is the response.
    background = BackgroundTasks()
    ctx = QueryContext.of(request.app, rate_limits=request_states(request))
    response = await answers.answer(ctx, subject.tenant_id, params, background)
    await background()
    lines = [response.answer]
    if response.citations:
        lines.append("\nSources:")
        for c in sorted(response.citations, key=lambda c: c.number):
            lines.append(f"[{c.number}] {c.title or '(untitled)'} (document {c.document_id})")
    return CallToolResult(
        content=[TextContent(type="text", text="\n".join(lines))],
        structured_content=response.model_dump(mode="json"),
    )


async def _list_collections(
    request: Request, subject: AuthSubject, page: int, size: int
) -> CallToolResult:
    async with unit_of_work(request.app.state.sessionmaker, write=False) as session:
        result = await collections.list_page(session, subject, Params(page=page, size=size))
    out = CollectionsOutput(
        collections=list(result.items),
        total=result.total or 0,
        page=result.page or page,
        pages=result.pages or 0,
    )
    lines = [f"{out.total} collection(s); page {out.page} of {max(out.pages, 1)}:"]
    for c in out.collections:
        lines.append(
            f"- {c.name} (id {c.id}, {c.status.value}): {c.document_count} document(s), "
            f"{c.chunk_count} chunk(s)" + (f" — {c.description}" if c.description else "")
        )
    return CallToolResult(
        content=[TextContent(type="text", text="\n".join(lines))],
        structured_content=out.model_dump(mode="json"),
    )


async def _get_document(
    request: Request,
    subject: AuthSubject,
    document_id: uuid.UUID,
    collection_id: uuid.UUID | None,
) -> CallToolResult:
    async with unit_of_work(request.app.state.sessionmaker, write=False) as session:
        # Scoped to the key's tenant, as the route is.
        document = documents.to_schema(
            await documents.get(session, subject, collection_id, document_id)
        )
    text = (
        f"{document.title} (document {document.id}, collection {document.collection_id}): "
        f"{document.status.value}, {document.chunk_count} chunk(s), "
        f"{document.content_type}, {document.size_bytes} bytes"
        + (f"; error: {document.error}" if document.error else "")
        + (f"; metadata: {document.metadata}" if document.metadata else "")
    )
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=document.model_dump(mode="json"),
    )


def register_tools(server: MCPServer[Any]) -> None:
    """Add Atrium's tools to ``server``."""

    # Each function is named after its tool: the SDK's argument errors name the function.
    async def search(
        query: Query,
        ctx: Context[Any, Any],
        collection_ids: CollectionIds = None,
        top_k: Annotated[int, Field(ge=1, le=100, description="Chunks to return (1-100).")] = 5,
        filters: Filters = None,
        mode: Mode = SearchMode.hybrid,
        min_score: Annotated[
            float | None, Field(ge=-1, le=1, description="Drop chunks scoring below this.")
        ] = None,
    ) -> Annotated[CallToolResult, SearchOutput]:
        """Find the passages of this tenant's documents most relevant to a query.

        Returns numbered chunks, best first, each with its document id, title, collection id,
        score and text: quote them and cite them as [n]. Needs the API-key scope 'search'.
        """

        async def run(request: Request, subject: AuthSubject) -> CallToolResult:
            params = _validated(
                SearchRequest,
                query=query,
                collection_ids=collection_ids,
                top_k=top_k,
                filters=filters,
                mode=mode,
                min_score=min_score,
            )
            return await _search(request, subject, params)

        return await _call(ctx, "search", run)

    async def answer(
        query: Query,
        ctx: Context[Any, Any],
        collection_ids: CollectionIds = None,
        top_k: Annotated[int, Field(ge=1, le=50, description="Chunks to answer from (1-50).")] = 5,
        filters: Filters = None,
        mode: Mode = SearchMode.hybrid,
    ) -> Annotated[CallToolResult, AnswerResponse]:
        """Answer a question from this tenant's documents, with numbered citations.

        Every [n] in the answer points to sources[n-1] (document id, title, text). With an LLM
        configured on the server the answer is written by it; otherwise it quotes the most
        relevant sentences. Needs the API-key scope 'answer'.
        """

        async def run(request: Request, subject: AuthSubject) -> CallToolResult:
            params = _validated(
                AnswerRequest,
                query=query,
                collection_ids=collection_ids,
                top_k=top_k,
                filters=filters,
                mode=mode,
            )
            return await _answer(request, subject, params)

        return await _call(ctx, "answer", run)

    async def list_collections(
        ctx: Context[Any, Any],
        page: Annotated[int, Field(ge=1, le=MAX_PAGE, description="Page number.")] = 1,
        size: Annotated[int, Field(ge=1, le=100, description="Collections per page.")] = 50,
    ) -> Annotated[CallToolResult, CollectionsOutput]:
        """List this tenant's collections by name, with their ids and document counts.

        Pass ids to search or answer (collection_ids) to search only some collections.
        Needs the API-key scope 'collections:read'.
        """

        async def run(request: Request, subject: AuthSubject) -> CallToolResult:
            return await _list_collections(request, subject, page, size)

        return await _call(ctx, "list_collections", run)

    async def get_document(
        document_id: Annotated[
            uuid.UUID, Field(description="A document id, as search results give it.")
        ],
        ctx: Context[Any, Any],
        collection_id: Annotated[
            uuid.UUID | None, Field(description="Its collection, to check it is there.")
        ] = None,
    ) -> Annotated[CallToolResult, Document]:
        """Get one document's record: title, collection, metadata, processing status, size.

        Needs the API-key scope 'documents:read'.
        """

        async def run(request: Request, subject: AuthSubject) -> CallToolResult:
            return await _get_document(request, subject, document_id, collection_id)

        return await _call(ctx, "get_document", run)

    titles: dict[Callable[..., Any], str] = {
        search: "Search documents",
        answer: "Answer a question",
        list_collections: "List collections",
        get_document: "Get a document",
    }
    for fn, title in titles.items():
        server.add_tool(
            fn,
            name=fn.__name__,
            title=title,
            # The docstring, without its indentation: it is what the model reads.
            description=inspect.cleandoc(fn.__doc__ or ""),
            annotations=_READ_ONLY,
        )
