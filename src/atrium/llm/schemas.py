"""Request and response bodies of grounded answers."""

from __future__ import annotations

import enum
import uuid
from typing import Any

from pydantic import BaseModel, Field

from atrium.retrieval.schemas import SearchParams


class AnswerMode(enum.StrEnum):
    """How the answer was produced."""

    generative = "generative"
    extractive = "extractive"


class AnswerRequest(SearchParams):
    """A question to answer from the tenant's documents."""

    top_k: int = Field(5, ge=1, le=50, description="How many chunks to give as sources (1-50).")
    stream: bool = Field(
        False,
        description=(
            "Answer as Server-Sent Events: `retrieval` (sources), `delta` (text), then `done` "
            "(citations, usage) or `error`."
        ),
    )
    model: str | None = Field(
        None,
        max_length=200,
        description="Another allowed model for this request (ATRIUM_LLM_ALLOWED_MODELS).",
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int | None = Field(
        None, ge=1, description="Answer length limit, up to ATRIUM_LLM_MAX_TOKENS_LIMIT."
    )


class Source(BaseModel):
    """A retrieved chunk given to the model, numbered as cited."""

    number: int = Field(..., description="The number citations use: [1], [2]...")
    chunk_id: uuid.UUID
    document_id: uuid.UUID
    collection_id: uuid.UUID
    title: str | None
    score: float
    text: str
    metadata: dict[str, Any]


class Citation(BaseModel):
    """A source the answer cites."""

    number: int
    chunk_id: uuid.UUID
    document_id: uuid.UUID
    collection_id: uuid.UUID
    title: str | None


class TokenUsage(BaseModel):
    """LLM tokens consumed (0 for extractive answers)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AnswerTimings(BaseModel):
    """Milliseconds spent in each stage."""

    embedding_ms: float = 0.0
    search_ms: float = 0.0
    fusion_ms: float = 0.0
    rerank_ms: float = 0.0
    cache_ms: float = 0.0
    llm_ms: float = 0.0
    total_ms: float = 0.0


class AnswerResponse(BaseModel):
    """A grounded answer."""

    answer: str = Field(..., description="The answer; [n] markers cite `sources`.")
    mode: AnswerMode
    model: str | None = Field(None, description="The LLM that wrote it (generative mode).")
    prompt_version: str | None = Field(None, description="The prompt file used.")
    citations: list[Citation]
    sources: list[Source]
    usage: TokenUsage
    cache_hit: bool = Field(False, description="Whether retrieval came from the cache.")
    timings: AnswerTimings
