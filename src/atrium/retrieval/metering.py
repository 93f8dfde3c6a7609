"""Metering of searches, answers and LLM tokens: the one place retrieval talks to billing.

Work is reserved against the tenant's quota before it starts (a tenant over its plan gets a
402 before anything is spent; the caller's per-minute rate limit is counted in the same Redis
script as the first hold, so a query meets quota once) and settled with what was really used
once it is done; failed work gives its reservation back. Settled work is written to the
billing database in batches (:meth:`atrium.billing.quota.Reservation.record_later`), so a
search costs one Redis script, not a MySQL transaction.

Stage latencies and token counts also go to the Prometheus metrics here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from atrium.billing.quota import Metric, Reservation
from atrium.kit import metrics
from atrium.kit.ratelimit import Bucket
from atrium.retrieval.context import QueryContext

__all__ = ["Metric", "Reservation", "observe", "release", "reserve", "settle"]


async def reserve(
    ctx: QueryContext,
    tenant_id: uuid.UUID,
    metric: Metric,
    amount: int = 1,
    *,
    rate_limit: Bucket | None = None,
    alongside: Sequence[tuple[str, ...]] = (),
    writes: Sequence[tuple[Any, ...]] = (),
) -> Reservation:
    """Hold ``amount`` of ``metric`` for ``tenant_id``.

    Args:
        ctx: the query's context (its quota engine; its rate-limit outcomes).
        tenant_id: the caller's tenant.
        metric: ``Metric.searches``, ``Metric.answers`` or ``Metric.llm_tokens``.
        amount: how much to hold (for tokens: the most the request may use).
        rate_limit: the caller's bucket (``ctx.rate_limit``) for the request's first hold:
            counted in the same Redis script, so a refused request holds nothing.
        alongside: Redis reads to make in the same round trip (``reservation.replies``).
        writes: best-effort Redis writes to carry in the same round trip (queued result-cache
            fills, :class:`atrium.retrieval.cache.PendingWrites`).

    Raises:
        TooManyRequests: ``rate_limit`` is spent (429).
        atrium.billing.quota.QuotaExceeded: the plan has no room left (402).
    """
    return await ctx.quota.reserve(tenant_id, metric, amount).acquire(
        alongside, writes=writes, rate_limit=rate_limit, rate_limits=ctx.rate_limits
    )


async def settle(reservation: Reservation | None, actual: int | None = None) -> None:
    """Record the work (``actual``, default: the amount reserved). Never raises.

    Searches, answers and tokens are queued for the quota engine's next batched write (within
    a second; the reservation holds the capacity until then): one MySQL transaction per
    search cost more than the search itself.
    """
    if reservation is not None:
        await reservation.record_later(actual)


async def release(reservation: Reservation | None) -> None:
    """Give a reservation back: the work was not done."""
    if reservation is not None:
        await reservation.release()


def observe(
    *,
    embedding_ms: float = 0.0,
    search_ms: float = 0.0,
    fusion_ms: float = 0.0,
    rerank_ms: float = 0.0,
    llm_ms: float = 0.0,
    hybrid: bool = False,
    model: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> None:
    """Stage latencies and LLM tokens of one query, for the Prometheus metrics.

    ``hybrid``: the search stage read the full-text index (lexical or hybrid mode).
    """
    if embedding_ms:
        metrics.observe_stage("query_embed", embedding_ms / 1000)
    if search_ms:
        metrics.observe_stage("text_search" if hybrid else "vector_search", search_ms / 1000)
    if fusion_ms:
        metrics.observe_stage("fusion", fusion_ms / 1000)
    if rerank_ms:
        metrics.observe_stage("rerank", rerank_ms / 1000)
    if llm_ms:
        metrics.observe_stage("answer", llm_ms / 1000)
    if model and (prompt_tokens or completion_tokens):
        metrics.record_llm_tokens(model, prompt=prompt_tokens, completion=completion_tokens)
