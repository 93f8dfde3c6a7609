"""Request and response bodies of search."""

from __future__ import annotations

import enum
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atrium.retrieval.filters import FilterError, parse_filters

MAX_QUERY_CHARS = 2000
MAX_COLLECTIONS = 100


class SearchMode(enum.StrEnum):
    """How chunks are ranked."""

    vector = "vector"
    lexical = "lexical"
    hybrid = "hybrid"


class SearchParams(BaseModel):
    """What to retrieve; shared by search and answer requests."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(
        ...,
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="The question or search text.",
        examples=["How do I rotate an API key?"],
    )
    collection_ids: list[uuid.UUID] | None = Field(
        None,
        max_length=MAX_COLLECTIONS,
        description="Collections to search; omitted or null: every collection of the tenant.",
    )
    top_k: int = Field(10, ge=1, le=100, description="How many chunks to return (1-100).")
    filters: dict[str, Any] | None = Field(
        None,
        description=(
            "Conditions on document metadata, all of which must hold: "
            '`{"lang": "en"}` (equals), `{"tags": {"$in": ["a", "b"]}}` (in), '
            '`{"year": {"$gte": 2020, "$lt": 2025}}` (range), `{"draft": {"$exists": false}}` '
            "(exists). See docs/search.md."
        ),
        examples=[{"lang": "en", "year": {"$gte": 2020}}],
    )
    mode: SearchMode = Field(
        SearchMode.hybrid,
        description=(
            "`vector` (semantic, by embedding), `lexical` (BM25 over the words: any term may "
            "match, rare terms weigh more; stemmed in each collection's language) or `hybrid` "
            "(both, their scores normalised and combined: the default, as it ranked best on "
            "every labelled set measured, see docs/performance.md)."
        ),
    )
    min_score: float | None = Field(
        None,
        ge=-1,
        le=1,
        description=(
            "Drop results whose `score` is below this: cosine similarity in vector mode, "
            "BM25 as a share of the best possible (0-1) in lexical mode, fused score (0-1) in "
            "hybrid mode, the rerank model's relevance score with `rerank`."
        ),
    )

    rerank: bool = Field(
        False,
        description=(
            "Rescore the best `rerank_top_n` candidates of the chosen mode with the server's "
            "rerank model (a cross-encoder), then keep the best `top_k`. 400 when the server "
            "has no rerank model (ATRIUM_RERANK_MODEL). A reranked search counts as one search."
        ),
    )
    rerank_top_n: int = Field(
        30,
        ge=1,
        le=1000,
        description=(
            "How many candidates are reranked (at least `top_k` are; the server caps it with "
            "ATRIUM_RERANK_MAX_CANDIDATES, 100 by default)."
        ),
    )

    @field_validator("query")
    @classmethod
    def _query_has_text(cls, value: str) -> str:
        value = " ".join(value.split())
        if not value:
            raise ValueError("query must contain some text")
        return value

    @field_validator("filters")
    @classmethod
    def _valid_filters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            parse_filters(value)
        except FilterError as exc:
            raise ValueError(str(exc)) from None
        return value


class SearchRequest(SearchParams):
    """A search request."""


class SearchResult(BaseModel):
    """One retrieved chunk."""

    chunk_id: uuid.UUID
    document_id: uuid.UUID
    collection_id: uuid.UUID
    title: str | None = Field(None, description="The document's title, when it has one.")
    ordinal: int = Field(..., description="Position of the chunk within its document.")
    score: float = Field(
        ...,
        description=(
            "Cosine similarity (vector), BM25 as a share of the best possible score (lexical), "
            "fused score (hybrid), or the rerank model's relevance score (with `rerank`)."
        ),
    )
    vector_score: float | None = Field(
        None, description="Cosine similarity to the query (not computed in lexical mode)."
    )
    text_score: float | None = Field(
        None, description="BM25 score in lexical and hybrid mode, when the text matched."
    )
    rerank_score: float | None = Field(
        None, description="The rerank model's relevance score, when the search was reranked."
    )
    text: str
    metadata: dict[str, Any] = Field(..., description="The document's metadata.")


class SearchTimings(BaseModel):
    """Milliseconds spent in each stage of this request."""

    embedding_ms: float = 0.0
    search_ms: float = 0.0
    fusion_ms: float = 0.0
    rerank_ms: float = 0.0
    cache_ms: float = 0.0
    total_ms: float = 0.0


class SearchResponse(BaseModel):
    """Search results, best first."""

    results: list[SearchResult]
    mode: SearchMode
    cache_hit: bool = Field(False, description="Whether the results came from the cache.")
    timings: SearchTimings
