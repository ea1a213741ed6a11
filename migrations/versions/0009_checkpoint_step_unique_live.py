"""Checkpoints: one *live* checkpoint per job and step. The unique constraint on (job_id, step)
also counted deleted rows, so a paused job whose checkpoints were deleted failed when it saved
those steps again after resuming; a partial unique index over live rows replaces it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("deleted_at IS NULL")


def upgrade() -> None:
    """Replace the (job_id, step) constraint by a unique index over live checkpoints."""
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("uq_checkpoints_job_id_step", type_="unique")
    op.create_index("uq_checkpoints_job_id_step_live", "checkpoints", ["job_id", "step"],
                    unique=True, postgresql_where=LIVE, sqlite_where=LIVE)


def downgrade() -> None:
    """Back to one checkpoint row per step, deleted or not (fails if both kinds exist)."""
    op.drop_index("uq_checkpoints_job_id_step_live", table_name="checkpoints")
    with op.batch_alter_table("checkpoints") as batch:
        batch.create_unique_constraint("uq_checkpoints_job_id_step", ["job_id", "step"])
