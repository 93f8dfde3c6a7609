"""Grounded answers: retrieve, then answer through litellm (or extract) with numbered citations.

Generative answers need ``ATRIUM_LLM_MODEL``; without one, answers are extractive. Provider
failures become 502/504 responses; once a stream has started they become an ``error`` event.
Each answer is metered (one answer plus its tokens) and logged in one line.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import BackgroundTasks

from atrium.config import Settings
from atrium.embedding.query import Vector, embed_query
from atrium.kit.errors import AtriumError, Unprocessable
from atrium.llm import client, extractive, prompts
from atrium.llm.schemas import (
    AnswerMode,
    AnswerRequest,
    AnswerResponse,
    AnswerTimings,
    Citation,
    Source,
    TokenUsage,
)
from atrium.retrieval import metering
from atrium.retrieval.context import QueryContext
from atrium.retrieval.metering import Metric
from atrium.retrieval.schemas import SearchResponse, SearchResult
from atrium.retrieval.service import log_fields, search

log = structlog.get_logger("atrium.llm")

_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


def llm_config(settings: Settings, req: AnswerRequest) -> client.LLMConfig | None:
    """The model and limits of this request, or None for an extractive answer.

    Raises:
        Unprocessable: a model that is not allowed, or max_tokens above the limit.
    """
    model = settings.llm_model
    if req.model is not None and req.model != settings.llm_model:
        if req.model not in settings.llm_allowed_models:
            allowed = [m for m in [settings.llm_model, *settings.llm_allowed_models] if m]
            raise Unprocessable(
                f"Model '{req.model}' is not available here; allowed: "
                + (", ".join(allowed) if allowed else "none (extractive answers only)")
            )
        model = req.model
    if req.max_tokens is not None and req.max_tokens > settings.llm_max_tokens_limit:
        raise Unprocessable(
            f"max_tokens is limited to {settings.llm_max_tokens_limit}; got {req.max_tokens}"
        )
    if not model:
        return None
    return client.LLMConfig(
        model=model,
        api_base=settings.llm_api_base or None,
        api_key=settings.llm_api_key.get_secret_value() or None,
        temperature=settings.llm_temperature if req.temperature is None else req.temperature,
        max_tokens=settings.llm_max_tokens if req.max_tokens is None else req.max_tokens,
        timeout=settings.llm_timeout_seconds,
    )


def number_sources(results: Sequence[SearchResult]) -> list[Source]:
    """Sources numbered from 1 in rank order."""
    return [
        Source(
            number=i,
            chunk_id=r.chunk_id,
            document_id=r.document_id,
            collection_id=r.collection_id,
            title=r.title,
            score=r.score,
            text=r.text,
            metadata=r.metadata,
        )
        for i, r in enumerate(results, start=1)
    ]


def format_sources(sources: Sequence[Source]) -> str:
    """The sources as the prompt shows them: ``[n] title`` then the text."""
    blocks = []
    for s in sources:
        head = f"[{s.number}]" + (f" {s.title}" if s.title else "")
        blocks.append(f"{head}\n{s.text.strip()}")
    return "\n\n".join(blocks)


def parse_citations(text: str, sources: Sequence[Source]) -> list[Citation]:
    """The sources cited in ``text`` (``[2]``, ``[1, 3]``), in order of first citation.

    Numbers that match no source are ignored (a model may invent them).
    """
    by_number = {s.number: s for s in sources}
    seen: list[int] = []
    for match in _CITATION.finditer(text):
        for part in match.group(1).split(","):
            n = int(part)
            if n in by_number and n not in seen:
                seen.append(n)
    return [
        Citation(
            number=n,
            chunk_id=by_number[n].chunk_id,
            document_id=by_number[n].document_id,
            collection_id=by_number[n].collection_id,
            title=by_number[n].title,
        )
        for n in seen
    ]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


@dataclass
class _Run:
    """State of one answer while it is produced."""

    req: AnswerRequest
    tenant_id: uuid.UUID
    start: float
    retrieval: SearchResponse
    query_vector: Vector | None
    sources: list[Source]
    cfg: client.LLMConfig | None
    answer_hold: metering.Reservation
    token_hold: metering.Reservation | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    llm_ms: float = 0.0

    async def reserve_tokens(self, ctx: QueryContext, messages: list[dict[str, str]]) -> None:
        """Hold the most tokens this answer may use: the prompt (estimated) plus max_tokens."""
        assert self.cfg is not None
        prompt_estimate = sum(len(m["content"]) for m in messages) // 3 + 16
        self.token_hold = await metering.reserve(
            ctx, self.tenant_id, Metric.llm_tokens, prompt_estimate + self.cfg.max_tokens
        )

    async def settle(self) -> None:
        """Record one answer and the tokens the provider reported."""
        await metering.settle(self.answer_hold)
        await metering.settle(self.token_hold, self.usage.total_tokens)
        t = self.retrieval.timings
        metering.observe(
            embedding_ms=t.embedding_ms,
            search_ms=t.search_ms,
            fusion_ms=t.fusion_ms,
            rerank_ms=t.rerank_ms,
            llm_ms=self.llm_ms,
            hybrid=self.retrieval.mode.value != "vector",
            model=self.cfg.model if self.cfg else None,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
        )

    async def release(self) -> None:
        """Nothing was answered: give every reservation back."""
        await metering.release(self.answer_hold)
        await metering.release(self.token_hold)

    @property
    def mode(self) -> AnswerMode:
        return AnswerMode.extractive if self.cfg is None else AnswerMode.generative

    def timings(self) -> AnswerTimings:
        t = self.retrieval.timings
        return AnswerTimings(
            embedding_ms=t.embedding_ms,
            search_ms=t.search_ms,
            fusion_ms=t.fusion_ms,
            rerank_ms=t.rerank_ms,
            cache_ms=t.cache_ms,
            llm_ms=self.llm_ms,
            total_ms=_ms(self.start),
        )

    def response(self, text: str) -> AnswerResponse:
        return AnswerResponse(
            answer=text,
            mode=self.mode,
            model=self.cfg.model if self.cfg else None,
            prompt_version=prompts.ANSWER_PROMPT if self.cfg else None,
            citations=parse_citations(text, self.sources),
            sources=self.sources,
            usage=self.usage,
            cache_hit=self.retrieval.cache_hit,
            timings=self.timings(),
        )

    def log(self, outcome: str, **extra: Any) -> None:
        log.info(
            "query",
            kind="answer",
            tenant_id=str(self.tenant_id),
            answer_mode=self.mode.value,
            model=self.cfg.model if self.cfg else None,
            stream=self.req.stream,
            outcome=outcome,
            **log_fields(self.retrieval),
            llm_ms=self.llm_ms,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            total_ms=_ms(self.start),
            **extra,
        )


async def _prepare(res: QueryContext, tenant_id: uuid.UUID, req: AnswerRequest) -> _Run:
    start = time.perf_counter()
    cfg = llm_config(res.settings, req)
    # The caller's rate limit is counted with this first hold (one Redis round trip).
    hold = await metering.reserve(res, tenant_id, Metric.answers, rate_limit=res.rate_limit)
    try:
        outcome = await search(res, tenant_id, req)
    except BaseException:
        await metering.release(hold)
        raise
    return _Run(
        req=req,
        tenant_id=tenant_id,
        start=start,
        retrieval=outcome.response,
        query_vector=outcome.query_vector,
        sources=number_sources(outcome.response.results),
        cfg=cfg,
        answer_hold=hold,
    )


async def _extract(res: QueryContext, run: _Run) -> list[str]:
    if not run.sources:
        return [extractive.NO_ANSWER]
    t = time.perf_counter()
    qvec = run.query_vector
    if qvec is None:  # retrieval came from the cache
        qvec, _ = await embed_query(res.settings, run.req.query, tenant_id=run.tenant_id)
    sentences = await extractive.extract(
        res.settings, qvec, [(s.number, s.text) for s in run.sources]
    )
    run.llm_ms = _ms(t)
    return extractive.render(sentences)


def _messages(run: _Run) -> list[dict[str, str]]:
    return prompts.load().render(sources=format_sources(run.sources), question=run.req.query)


async def answer(
    res: QueryContext,
    tenant_id: uuid.UUID,
    req: AnswerRequest,
    background: BackgroundTasks,
) -> AnswerResponse:
    """Answer ``req`` from the tenant's documents (not streamed).

    Args:
        res: the query's pools, settings and metering (its rate limit is counted with the
            answer's hold).
        tenant_id: the caller's tenant.
        req: the validated request.
        background: where usage is settled, after the response.

    Raises:
        Unprocessable: model or max_tokens outside the limits.
        NotFound: a requested collection is not the tenant's.
        TooManyRequests: the caller's rate limit is spent.
        PaymentRequired: the plan has no answers or tokens left.
        BadGateway, GatewayTimeout: the LLM provider failed or did not answer in time.
    """
    run = await _prepare(res, tenant_id, req)
    try:
        if run.cfg is None:
            text = " ".join(await _extract(res, run))
        elif not run.sources:
            text = extractive.NO_ANSWER
        else:
            messages = _messages(run)
            await run.reserve_tokens(res, messages)
            t = time.perf_counter()
            try:
                completion = await client.complete(run.cfg, messages)
            finally:
                run.llm_ms = _ms(t)
            text = completion.text.strip()
            run.usage = TokenUsage(
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
                total_tokens=completion.usage.total_tokens,
            )
    except BaseException as exc:
        await run.release()
        if isinstance(exc, AtriumError):
            run.log("error", error=exc.name, status=exc.status_code)
        raise
    response = run.response(text)
    background.add_task(run.settle)
    run.log("ok", citations=len(response.citations))
    return response


def _event(name: str, payload: Any) -> dict[str, str]:
    return {"event": name, "data": json.dumps(payload, separators=(",", ":"), default=str)}


async def answer_events(
    res: QueryContext, tenant_id: uuid.UUID, req: AnswerRequest
) -> AsyncIterator[dict[str, str]]:
    """Prepare a streamed answer; returns the iterator of its Server-Sent Events.

    Retrieval, and the opening of the LLM stream up to its first chunk, happen before this
    returns: their failures are plain error responses. Later failures become an ``error`` event.
    """
    run = await _prepare(res, tenant_id, req)
    stream: client.Stream | None = None
    if run.cfg is not None and run.sources:
        t = time.perf_counter()
        try:
            messages = _messages(run)
            await run.reserve_tokens(res, messages)
            stream = await client.open_stream(run.cfg, messages)
        except BaseException as exc:
            run.llm_ms = _ms(t)
            await run.release()
            if isinstance(exc, AtriumError):
                run.log("error", error=exc.name, status=exc.status_code)
            raise
        run.llm_ms = _ms(t)
    return _events(res, run, stream)


async def _events(
    res: QueryContext, run: _Run, stream: client.Stream | None
) -> AsyncIterator[dict[str, str]]:
    outcome = "disconnected"
    try:
        yield _event(
            "retrieval",
            {
                "sources": [s.model_dump(mode="json") for s in run.sources],
                "cache_hit": run.retrieval.cache_hit,
                "timings": run.retrieval.timings.model_dump(),
            },
        )
        pieces: list[str] = []
        if stream is None:
            extracted = await _extract(res, run) if run.cfg is None else [extractive.NO_ANSWER]
            for i, piece in enumerate(extracted):
                text = piece if i == 0 else " " + piece
                pieces.append(text)
                yield _event("delta", {"text": text})
        else:
            t = time.perf_counter() - run.llm_ms / 1000
            try:
                async for text in stream.deltas():
                    pieces.append(text)
                    yield _event("delta", {"text": text})
            except AtriumError as exc:
                run.llm_ms = _ms(t)
                outcome = "error"
                if stream.usage is not None:
                    run.usage = _usage(stream.usage)
                yield _event(
                    "error",
                    {"error": exc.name, "detail": exc.detail, "status": exc.status_code},
                )
                return
            run.llm_ms = _ms(t)
            if stream.usage is not None:
                run.usage = _usage(stream.usage)
        response = run.response("".join(pieces).strip())
        outcome = "ok"
        yield _event(
            "done",
            {
                "answer": response.answer,
                "mode": response.mode.value,
                "model": response.model,
                "prompt_version": response.prompt_version,
                "citations": [c.model_dump(mode="json") for c in response.citations],
                "usage": response.usage.model_dump(),
                "timings": response.timings.model_dump(),
            },
        )
    finally:
        if stream is not None:
            await stream.close()
        if outcome == "ok" or run.usage.total_tokens:
            # Tokens the provider spent are charged even when the stream broke off.
            await run.settle()
        else:
            await run.release()
        run.log(outcome)


def _usage(u: client.Usage) -> TokenUsage:
    return TokenUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )
