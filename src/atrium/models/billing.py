"""Billing: each tenant's billing period and limit overrides, its usage, and sent warnings.

MySQL is the source of truth for usage; Redis only holds counters rebuilt from these rows.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, Date, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from atrium.models.base import Base, TimestampMixin, UTCDateTime, utcnow

#: ``usage_counters.period_start`` of counted metrics (levels that never reset).
LEVEL_PERIOD = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class BillingAccount(TimestampMixin, Base):
    """A tenant's billing period and its per-tenant limit overrides (one row per tenant).

    Periods are calendar months starting at ``period_anchor`` (the day and time of the month
    the tenant was created, clamped to the month's last day). Celery beat moves
    ``period_start``/``period_end`` forward when a period ends.
    """

    __tablename__ = "billing_accounts"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    period_anchor: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    period_start: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    period_end: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
    #: ``{limit name: int or null (unlimited)}`` set by a superuser; wins over the plan.
    overrides: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class UsageCounter(Base):
    """How much of a metric a tenant used in a period (levels use :data:`LEVEL_PERIOD`)."""

    __tablename__ = "usage_counters"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    period_start: Mapped[dt.datetime] = mapped_column(UTCDateTime(), primary_key=True)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Bumped by every change; Redis keeps the newest version it saw, so a late write from an
    #: older change can never overwrite a newer figure.
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class UsageDaily(Base):
    """Daily figures for the usage history: consumption for monthly metrics, the level at the
    end of the day for counted ones."""

    __tablename__ = "usage_daily"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageAlert(Base):
    """A usage warning already sent: at most one per tenant, metric, period and threshold."""

    __tablename__ = "usage_alerts"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    period_start: Mapped[dt.datetime] = mapped_column(UTCDateTime(), primary_key=True)
    threshold: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
