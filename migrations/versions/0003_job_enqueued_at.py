"""Jobs remember when their message was last sent: the reconciler re-sends lost ones.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

`jobs.enqueued_at` is set each time a job's message is sent to the broker (at creation and by
the reconciler); a job still `queued` long after it is presumed lost (a broker restart, an
enqueue that failed) and sent again.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.enqueued_at (nullable: jobs created before it, or whose send failed)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop jobs.enqueued_at."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueued_at")
