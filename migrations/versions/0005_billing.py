"""billing: accounts (periods, overrides), usage counters, daily usage, usage alerts

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from fastapi_users_db_sqlalchemy.generics import GUID

from atrium.models.base import UTCDateTime

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "billing_accounts",
        sa.Column("tenant_id", GUID(), nullable=False),
        sa.Column("period_anchor", UTCDateTime(), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("period_end", UTCDateTime(), nullable=False),
        sa.Column("overrides", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        _tenant_fk("billing_accounts"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_billing_accounts"),
    )
    op.create_index("ix_billing_accounts_period_end", "billing_accounts", ["period_end"])
    op.create_table(
        "usage_counters",
        sa.Column("tenant_id", GUID(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        _tenant_fk("usage_counters"),
        sa.PrimaryKeyConstraint("tenant_id", "metric", "period_start", name="pk_usage_counters"),
    )
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", GUID(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        _tenant_fk("usage_daily"),
        sa.PrimaryKeyConstraint("tenant_id", "metric", "day", name="pk_usage_daily"),
    )
    op.create_table(
        "usage_alerts",
        sa.Column("tenant_id", GUID(), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _tenant_fk("usage_alerts"),
        sa.PrimaryKeyConstraint(
            "tenant_id", "metric", "period_start", "threshold", name="pk_usage_alerts"
        ),
    )


def downgrade() -> None:
    op.drop_table("usage_alerts")
    op.drop_table("usage_daily")
    op.drop_table("usage_counters")
    op.drop_index("ix_billing_accounts_period_end", table_name="billing_accounts")
    op.drop_table("billing_accounts")
