"""Jobs record the phase their running attempt is in, with the phase's own progress and
estimate; classification files record their label set, so that job creation can check a
validation file's labels against the training file's.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10

Files uploaded before this revision have no recorded labels (NULL): a job on them is checked
when it trains, as before.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.progress_phase, phase_step, phase_total, phase_estimated_finish and
    files.labels."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_phase", sa.String(32), nullable=True))
        batch.add_column(sa.Column("phase_step", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("phase_total", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("phase_estimated_finish", sa.DateTime(timezone=True),
                                   nullable=True))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column(
            "labels", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                             "postgresql"), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("files") as batch:
        batch.drop_column("labels")
    with op.batch_alter_table("jobs") as batch:
        for column in ("phase_estimated_finish", "phase_total", "phase_step", "progress_phase"):
            batch.drop_column(column)
