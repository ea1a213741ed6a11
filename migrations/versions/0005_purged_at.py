"""Deleted files and adapters record when their stored bytes were removed.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

A delete commits the row's `deleted_at` first and removes the object afterwards, stamping
`purged_at`; a row deleted but never purged (the object delete failed after the commit) is an
orphan that the reconciler's sweep removes. Rows deleted before this revision had their bytes
removed before the commit, so they count as purged when they were deleted.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("files", "adapters")


def upgrade() -> None:
    """Add purged_at to files and adapters; rows already deleted were purged then."""
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        op.execute(sa.text(f"UPDATE {table} SET purged_at = deleted_at "
                           "WHERE deleted_at IS NOT NULL"))


def downgrade() -> None:
    """Drop purged_at from files and adapters."""
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("purged_at")
