"""What is metered (:class:`Metric`) and the error raised when a plan has no room left."""

from __future__ import annotations

import datetime as dt
import enum

from atrium.billing.plans import Limit
from atrium.kit.errors import PaymentRequired


class Metric(enum.StrEnum):
    """Something metered. Levels go up and down; the others are monthly totals."""

    members = "members"
    collections = "collections"
    documents = "documents"
    stored_bytes = "stored_bytes"
    chunks = "chunks"
    searches = "searches"
    answers = "answers"
    llm_tokens = "llm_tokens"
    embedding_tokens = "embedding_tokens"

    @property
    def is_level(self) -> bool:
        """Whether this is a level (never resets) rather than a monthly total."""
        return self in LEVEL_METRICS

    @property
    def limit(self) -> Limit:
        """The plan limit that caps this metric."""
        return METRIC_LIMITS[self]

    @property
    def label(self) -> str:
        """Human wording for mails and messages."""
        return self.value.replace("_", " ")


LEVEL_METRICS = frozenset(
    {Metric.members, Metric.collections, Metric.documents, Metric.stored_bytes, Metric.chunks}
)
METRIC_LIMITS: dict[Metric, Limit] = {
    Metric.members: Limit.members,
    Metric.collections: Limit.collections,
    Metric.documents: Limit.documents,
    Metric.stored_bytes: Limit.stored_bytes,
    Metric.chunks: Limit.chunks,
    Metric.searches: Limit.searches_per_month,
    Metric.answers: Limit.answers_per_month,
    Metric.llm_tokens: Limit.llm_tokens_per_month,
    Metric.embedding_tokens: Limit.embedding_tokens_per_month,
}


class QuotaExceeded(PaymentRequired):
    """A plan limit would be exceeded (402). ``detail``: metric, limit, used, resets_at."""

    def __init__(
        self, metric: Metric, limit: int, used: int, resets_at: dt.datetime | None, plan: str
    ) -> None:
        when = f"; it resets at {resets_at.isoformat()}" if resets_at else ""
        per = " this month" if not metric.is_level else ""
        message = (
            f"The {plan} plan allows {limit} {metric.label}{per} and {used} are used{when}. "
            "Upgrade the plan or free some capacity."
        )
        super().__init__(
            message,
            detail={
                "metric": metric.value,
                "limit": limit,
                "used": used,
                "resets_at": resets_at.isoformat() if resets_at else None,
                "message": message,
            },
        )
        self.metric = metric
