"""Job items without foreign keys: a million-line upload's per-row checks of its job and chunk were two fifths
of PostgreSQL's work in the items' COPY (and SQLite checks them too, with ``foreign_keys=ON``).  Items are
written only with their job and chunks, in the submission's transaction, and deleted before them
(``JobService.delete``), so the constraints guarded nothing the code does not.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_items") as batch:  # SQLite rebuilds the table; PostgreSQL drops in place
        batch.drop_constraint("fk_job_items_chunk_id_job_chunks", type_="foreignkey")
        batch.drop_constraint("fk_job_items_job_id_jobs", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("job_items") as batch:
        batch.create_foreign_key("fk_job_items_job_id_jobs", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
        batch.create_foreign_key("fk_job_items_chunk_id_job_chunks", "job_chunks", ["chunk_id"], ["id"],
                                 ondelete="SET NULL")
