"""Per-key limits (a JSON object on the key) and daily usage per key.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("limits", sa.JSON(), nullable=True))
    op.create_table(
        "key_usage",
        sa.Column("key_id", sa.String(40), primary_key=True),
        sa.Column("day", sa.Date(), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("embed_inputs", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("key_usage")
    op.drop_column("api_keys", "limits")
