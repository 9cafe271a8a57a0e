"""Scheduling: chunks held in SQL until the dispatcher releases them to the broker (jobs/dispatch.py), and a
job's priority.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("job_chunks", sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "priority")
    op.drop_column("job_chunks", "held")
