"""Registered base models say the dtype their weights load in.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`dtype` is what a job's `hyperparameters.dtype: "auto"` trains in and what serving loads the
model in: 'auto' (the checkpoint's own), 'bfloat16', 'float16' or 'float32'. Models
registered before this revision keep loading in their checkpoint's dtype ('auto').
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add base_models.dtype, 'auto' for every existing row."""
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("dtype", sa.String(16), nullable=False,
                                   server_default="auto"))


def downgrade() -> None:
    """Drop base_models.dtype."""
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("dtype")
