"""collection language: the full-text configuration of a collection's chunks

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.add_column(
            sa.Column("language", sa.String(32), server_default="english", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("collections") as batch:
        batch.drop_column("language")
