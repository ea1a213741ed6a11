"""Checkpoints: a job's delta at a step, its metrics, and the training state it resumes from;
the step a job's adapter was taken at (`jobs.result_step`: the best checkpoint's, or the last),
the tokens it has trained on, its estimated finish and its results file (per-step metrics CSV).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


ID = sa.String(length=64)


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the checkpoints table."""
    op.create_table(
        "checkpoints",
        sa.Column("id", ID, nullable=False),
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("base_model", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                                    "postgresql"), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("deleted_at", _timestamp(), nullable=True),
        sa.Column("purged_at", _timestamp(), nullable=True),
        sa.ForeignKeyConstraint(["base_model"], ["base_models.id"],
                                name=op.f("fk_checkpoints_base_model_base_models")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_checkpoints_job_id_jobs")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name=op.f("fk_checkpoints_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("job_id", "step", name=op.f("uq_checkpoints_job_id_step")),
    )
    op.create_index(op.f("ix_checkpoints_tenant_id_job_id"), "checkpoints",
                    ["tenant_id", "job_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("result_step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("trained_tokens", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("estimated_finish", _timestamp(), nullable=True))
        batch.add_column(sa.Column("result_file", ID, nullable=True))


def downgrade() -> None:
    """Drop the checkpoints table and jobs.result_step."""
    with op.batch_alter_table("jobs") as batch:
        for column in ("result_step", "trained_tokens", "estimated_finish", "result_file"):
            batch.drop_column(column)
    op.drop_table("checkpoints")
