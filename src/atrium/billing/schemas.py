"""Schemas of the plans, plan administration and usage routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from atrium.billing.plans import Limit

_UNLIMITED = "null means unlimited."


class PlanLimits(BaseModel):
    """Every limit of a plan; ``null`` means unlimited."""

    members: int | None = Field(description="Members of the tenant. " + _UNLIMITED)
    collections: int | None = Field(description="Collections. " + _UNLIMITED)
    documents: int | None = Field(description="Documents stored. " + _UNLIMITED)
    stored_bytes: int | None = Field(description="Bytes of documents stored. " + _UNLIMITED)
    chunks: int | None = Field(description="Indexed chunks. " + _UNLIMITED)
    searches_per_month: int | None = Field(description="Searches per period. " + _UNLIMITED)
    answers_per_month: int | None = Field(description="Answers per period. " + _UNLIMITED)
    llm_tokens_per_month: int | None = Field(
        description="LLM tokens (prompt + completion) per period. " + _UNLIMITED
    )
    embedding_tokens_per_month: int | None = Field(
        description="Embedding tokens per period. " + _UNLIMITED
    )
    requests_per_minute_per_key: int | None = Field(
        description="Requests per minute per API key (a key may have its own). " + _UNLIMITED
    )
    requests_per_minute_per_user: int | None = Field(
        description="Requests per minute per user in this tenant. " + _UNLIMITED
    )
    max_upload_bytes: int | None = Field(description="Largest upload in bytes. " + _UNLIMITED)

    @classmethod
    def of(cls, limits: dict[Limit, int | None]) -> PlanLimits:
        """Build from a limits mapping."""
        return cls(**{k.value: v for k, v in limits.items()})


class Plan(BaseModel):
    """A plan a tenant can be on."""

    name: str = Field(description="Identifier (``free``, ``pro``, ``enterprise``...).")
    title: str
    description: str
    price_usd_per_month: float = Field(description="List price; 0 for free or by contract.")
    limits: PlanLimits


class PlanCatalog(BaseModel):
    """Every plan, and the one new tenants start on."""

    default_plan: str
    plans: list[Plan]


LimitValue = Annotated[int, Field(ge=0)] | None


class TenantPlanUpdate(BaseModel):
    """A superuser's change to a tenant's plan and limit overrides."""

    plan: str = Field(
        description="The plan to put the tenant on (see GET /v1/plans).", examples=["pro"]
    )
    overrides: dict[Limit, LimitValue] | None = Field(
        default=None,
        description=(
            "Per-tenant limits that win over the plan's (null value: unlimited). Omitted: the "
            "current overrides are kept; {} clears them."
        ),
    )


class TenantPlan(BaseModel):
    """A tenant's plan, its overrides and the limits in force."""

    tenant_id: uuid.UUID
    plan: str
    overrides: dict[str, int | None]
    limits: PlanLimits = Field(description="The plan's limits with the overrides applied.")
    period_start: dt.datetime
    period_end: dt.datetime


class MetricUsage(BaseModel):
    """Where a tenant stands on one metric."""

    metric: str
    kind: Literal["level", "monthly"] = Field(
        description="level: a count that goes up and down; monthly: a total that resets."
    )
    used: int = Field(description="Recorded usage (this period for monthly metrics).")
    reserved: int = Field(description="Held by work in progress; counts against the limit.")
    limit: int | None = Field(description="The limit in force; null means unlimited.")
    percent: float | None = Field(description="used / limit in percent; null when unlimited.")
    resets_at: dt.datetime | None = Field(description="End of the period; null for levels.")


class Usage(BaseModel):
    """A tenant's usage in the current billing period."""

    tenant_id: uuid.UUID
    plan: str
    period_start: dt.datetime
    period_end: dt.datetime
    metrics: list[MetricUsage]
    requests_per_minute_per_key: int | None
    requests_per_minute_per_user: int | None
    max_upload_bytes: int | None


class UsageDay(BaseModel):
    """One day of the usage history."""

    date: dt.date
    values: dict[str, int] = Field(
        description="Per metric: what the day consumed (monthly metrics) or the level at the "
        "end of the day (levels)."
    )


class UsageHistory(BaseModel):
    """Daily figures, oldest first, one entry per day (days without activity included)."""

    tenant_id: uuid.UUID
    days: list[UsageDay]
