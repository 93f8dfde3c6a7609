"""Metering of searches, answers and LLM tokens: the one place retrieval talks to billing.

Work is reserved against the tenant's quota before it starts (a tenant over its plan gets a
402 before anything is spent) and settled with what was really used once it is done; failed
work gives its reservation back. Settled work is written to the billing database in batches
(:meth:`atrium.billing.quota.Reservation.record_later`), so a search costs one Redis script, not a
MySQL transaction.

Stage latencies and token counts also go to the Prometheus metrics here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from atrium.billing.quota import Metric, Quota, Reservation
from atrium.kit import metrics

__all__ = ["Metric", "Reservation", "observe", "release", "reserve", "settle"]


async def reserve(
    ctx: HTTPConnection | Starlette,
    tenant_id: uuid.UUID,
    metric: Metric,
    amount: int = 1,
    *,
    alongside: Sequence[tuple[str, ...]] = (),
) -> Reservation:
    """Hold ``amount`` of ``metric`` for ``tenant_id``.

    Args:
        ctx: the request (or app) whose quota engine to use.
        tenant_id: the caller's tenant.
        metric: ``Metric.searches``, ``Metric.answers`` or ``Metric.llm_tokens``.
        amount: how much to hold (for tokens: the most the request may use).
        alongside: Redis reads to make in the same round trip (``reservation.replies``).

    Raises:
        atrium.billing.quota.QuotaExceeded: the plan has no room left (402).
    """
    return await Quota.of(ctx).reserve(tenant_id, metric, amount).acquire(alongside)


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
