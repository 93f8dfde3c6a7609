"""Reranking of search candidates by a hosted model, through litellm's rerank API.

One call: :func:`rerank` sends the query and the candidates' texts to ``settings.rerank_model``
and answers the candidates' indexes, best first, with the provider's relevance scores and the
time the call took (for a search's ``rerank_ms``). :func:`check_rerank` refuses a request before
any work is done when reranking is not configured or asks for too many candidates.

Limits, as for answers (:mod:`atrium.llm.client`): no retries, a hard ``asyncio.timeout``, a
time-out answered as 504 and any other provider failure as 502 naming the model. Each text is
cut to :data:`MAX_DOCUMENT_CHARS` first: providers bill by tokens, and a reranker reads only its
first few hundred tokens of a document anyway.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atrium.kit.errors import AtriumError, BadGateway, BadRequest, GatewayTimeout, Unprocessable
from atrium.kit.litellm import litellm_module

if TYPE_CHECKING:
    from atrium.config import Settings

#: Characters of each document sent to the provider (about 1,000 tokens of English).
MAX_DOCUMENT_CHARS = 4000


class RerankNotConfigured(BadRequest):
    """Reranking was asked for, but this server has no rerank model configured."""

    def __init__(self) -> None:
        super().__init__(
            "Reranking is not available on this server: its operator must set "
            "ATRIUM_RERANK_MODEL (e.g. cohere/rerank-english-v3.0), or send the request "
            "without rerank."
        )


@dataclass(frozen=True)
class Reranked:
    """What one rerank call answered.

    Attributes:
        ranking: ``(index into the documents, relevance score)`` pairs, best first, at most
            ``top_n`` of them. Scores are the provider's own: comparable within one call only.
        elapsed_ms: how long the call took, in milliseconds (0 when no provider was called).
        model: the rerank model that ranked them.
    """

    ranking: list[tuple[int, float]]
    elapsed_ms: float
    model: str


def is_configured(settings: Settings) -> bool:
    """Whether a rerank model is configured."""
    return bool(settings.rerank_model)


def check_rerank(settings: Settings, candidates: int) -> None:
    """Refuse a rerank request this server cannot serve, before any search work is done.

    Args:
        settings: the settings.
        candidates: how many search candidates the request wants reranked (its
            ``rerank_top_n``).

    Raises:
        RerankNotConfigured: no rerank model is configured (400).
        Unprocessable: more candidates than ``rerank_max_candidates`` (422).
    """
    if not is_configured(settings):
        raise RerankNotConfigured()
    if candidates > settings.rerank_max_candidates:
        raise Unprocessable(
            f"rerank_top_n is limited to {settings.rerank_max_candidates} candidates; "
            f"got {candidates}"
        )


#: Exceptions behind a provider that could not be reached (httpx's, aiohttp's).
_UNREACHABLE = frozenset({"ConnectError", "ClientConnectorError", "ClientConnectorDNSError"})


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: litellm keeps the original in ``original_exception``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nxt = getattr(current, "original_exception", None)
        current = (
            nxt if isinstance(nxt, BaseException) else (current.__cause__ or current.__context__)
        )


def _provider_error(exc: BaseException, settings: Settings, api_key: str) -> AtriumError:
    """The client-facing error for a provider failure: 504 for time-outs, 502 otherwise."""
    if isinstance(exc, AtriumError):
        return exc
    model = settings.rerank_model
    causes = list(_causes(exc))
    if any(isinstance(c, TimeoutError) or "Timeout" in type(c).__name__ for c in causes):
        return GatewayTimeout(
            f"The rerank model ({model}) did not answer within "
            f"{settings.rerank_timeout_seconds:g} s; try again, or search without rerank."
        )
    status = getattr(exc, "status_code", None)
    # litellm appends a traceback and a bug-report link to some messages: the first line says it.
    text = str(getattr(exc, "message", "") or exc).strip()
    if api_key:
        # A provider may echo the credentials it refused; they must not reach a client. Cut
        # after replacing, so no part of the key survives the cut either.
        text = text.replace(api_key, "***")
    lines = text.splitlines()
    first = lines[0][:300] if lines else type(exc).__name__
    if any(isinstance(c, ConnectionError) or type(c).__name__ in _UNREACHABLE for c in causes):
        # litellm reports a refused connection as a 500 from the provider; say what happened.
        return BadGateway(f"Could not reach the rerank provider ({model}): {first}")
    # litellm also raises APIConnectionError, status 500, for failures before any request
    # (a missing API key): no provider answered that.
    answered = status and type(exc).__name__ != "APIConnectionError"
    where = f" answered {status}" if answered else " failed"
    return BadGateway(f"The rerank provider{where} ({model}): {first}")


def _ranking(response: Any, count: int, top_n: int, model: str) -> list[tuple[int, float]]:
    """The ``(index, score)`` pairs of a litellm ``RerankResponse``, checked and best first."""
    results = getattr(response, "results", None)
    if not isinstance(results, list):
        raise BadGateway(f"The rerank model ({model}) sent no results")
    seen: set[int] = set()
    ranking: list[tuple[int, float]] = []
    try:
        for item in results:
            index, score = int(item["index"]), float(item["relevance_score"])
            # An index outside the candidates would point the caller at the wrong chunk.
            if not 0 <= index < count or index in seen or math.isnan(score):
                raise ValueError(f"result index {index}, score {score}")
            seen.add(index)
            ranking.append((index, score))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadGateway(f"The rerank model ({model}) sent a malformed result: {exc}") from exc
    # Providers answer best first, but the contract is ours to keep; the sort is stable, so
    # ties keep the provider's order.
    ranking.sort(key=lambda r: -r[1])
    return ranking[:top_n]


async def rerank(settings: Settings, query: str, documents: Sequence[str], top_n: int) -> Reranked:
    """Rank ``documents`` by relevance to ``query`` with the configured rerank model.

    Args:
        settings: the settings (``rerank_*``).
        query: the search query.
        documents: the candidates' texts; each is cut to :data:`MAX_DOCUMENT_CHARS`.
        top_n: how many to keep (at least 1; more than ``len(documents)`` keeps them all).

    Returns:
        The best ``top_n`` indexes into ``documents`` with their scores, best first, and the
        time the provider took. No documents: an empty ranking, and no provider is called.

    Raises:
        RerankNotConfigured: no rerank model is configured (400).
        Unprocessable: more documents than ``rerank_max_candidates`` (422).
        GatewayTimeout: no answer within ``rerank_timeout_seconds`` (504).
        BadGateway: the provider failed, answered an error, or answered nonsense (502).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be at least 1; got {top_n}")
    check_rerank(settings, len(documents))
    model = settings.rerank_model
    if not documents:
        return Reranked(ranking=[], elapsed_ms=0.0, model=model)
    top_n = min(top_n, len(documents))
    api_key = settings.rerank_api_key.get_secret_value()
    params: dict[str, Any] = {
        "model": model,
        "query": query,
        "documents": [d[:MAX_DOCUMENT_CHARS] for d in documents],
        "top_n": top_n,
        "timeout": settings.rerank_timeout_seconds,
        "num_retries": 0,
        "max_retries": 0,
    }
    if settings.rerank_api_base:
        params["api_base"] = settings.rerank_api_base
    if api_key:
        params["api_key"] = api_key
    litellm = await litellm_module()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(settings.rerank_timeout_seconds):
            response = await litellm.arerank(**params)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise _provider_error(exc, settings, api_key) from exc
    elapsed_ms = (time.perf_counter() - started) * 1000
    return Reranked(
        ranking=_ranking(response, len(documents), top_n, model),
        elapsed_ms=elapsed_ms,
        model=model,
    )
