"""A configured key missing from SPEFT_API_KEYS is set aside, not revoked.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

`api_keys.unconfigured_at` is set at a start whose SPEFT_API_KEYS no longer lists a configured
key (refused while it is missing) and cleared when it is configured again; `revoked_at` is left
to `speft keys revoke`, which refuses a key for good. Keys revoked by the sync of earlier versions
stay revoked: they cannot be told apart from an operator's revocation.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add api_keys.unconfigured_at (NULL: configured now, or made by `speft keys create`)."""
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("unconfigured_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop api_keys.unconfigured_at."""
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("unconfigured_at")
