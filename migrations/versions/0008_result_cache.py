"""Deduplication and the result cache: a job's ``cache`` opt-in, an item's ``cached`` flag, and the cache itself
(results of deterministic requests by key, kept ``CORRAL_RESULT_CACHE_TTL`` seconds).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cache", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("job_items", sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "result_cache",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("result_cache")
    op.drop_column("job_items", "cached")
    op.drop_column("jobs", "cache")
