"""Base models registered from a storage key: the sha256 of their archive.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

A base model may now live in object storage as a tar archive (`speft models register
--storage-key`); workers download it verified against this checksum and cache it by it.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHA256 = sa.String(length=64)


def upgrade() -> None:
    """Add base_models.sha256 (nullable: built-in and folder models have no archive)."""
    with op.batch_alter_table("base_models") as batch:
        batch.add_column(sa.Column("sha256", SHA256, nullable=True))


def downgrade() -> None:
    """Drop base_models.sha256."""
    with op.batch_alter_table("base_models") as batch:
        batch.drop_column("sha256")
