"""Collections (OpenAI vector stores): collections, their documents, the documents' chunks with vectors, and
file batches.  Keyword search over chunk text is the database's own: an FTS5 table kept by triggers on SQLite
(external content, so the text is stored once), a generated ``tsvector`` column with a GIN index on PostgreSQL.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# porter stemming over unicode61 (accents folded): "running" finds "runs"; the query side quotes each term.
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE collection_chunks_fts USING fts5(text, content='collection_chunks', content_rowid='id', "
    "tokenize='porter unicode61 remove_diacritics 1')",
    "CREATE TRIGGER collection_chunks_fts_insert AFTER INSERT ON collection_chunks BEGIN "
    "INSERT INTO collection_chunks_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER collection_chunks_fts_delete AFTER DELETE ON collection_chunks BEGIN "
    "INSERT INTO collection_chunks_fts(collection_chunks_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
]
POSTGRES_FTS = [
    "ALTER TABLE collection_chunks ADD COLUMN tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    "CREATE INDEX ix_collection_chunks_tsv ON collection_chunks USING gin (tsv)",
]


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=True, index=True),
        sa.Column("name", sa.String(400), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("model", sa.String(400), nullable=False),
        sa.Column("model_digest", sa.String(64), nullable=False),
        sa.Column("chunk_tokens", sa.Integer(), nullable=False),
        sa.Column("chunk_overlap", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("expires_days", sa.Integer(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True, index=True),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("next_model", sa.String(400), nullable=True),
        sa.Column("next_digest", sa.String(64), nullable=True),
        sa.Column("reembed_job", sa.String(40), nullable=True),
    )
    op.create_table(
        "collection_documents",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
        sa.Column("collection_id", sa.String(40), sa.ForeignKey("collections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("source_id", sa.String(1000), nullable=False),
        sa.Column("file_id", sa.String(40), nullable=True),
        sa.Column("filename", sa.String(1000), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("usage_bytes", sa.BigInteger(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("last_error", sa.JSON(), nullable=True),
        sa.Column("chunk_tokens", sa.Integer(), nullable=False),
        sa.Column("chunk_overlap", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True, index=True),
        sa.Column("item_id", sa.BigInteger(), nullable=True),
        sa.Column("batch_id", sa.String(40), nullable=True, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("collection_id", "source_id", name="uq_collection_documents_collection_id_source_id"),
    )
    op.create_index("ix_collection_documents_status", "collection_documents", ["collection_id", "status"])
    op.create_table(
        "collection_chunks",
        sa.Column("id", BIGINT, primary_key=True, autoincrement=True),
        sa.Column("collection_id", sa.String(40), nullable=False),
        sa.Column("document_id", BIGINT, sa.ForeignKey("collection_documents.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("model_digest", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("end", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_collection_chunks_collection", "collection_chunks", ["collection_id", "model_digest"])
    op.create_table(
        "collection_batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("collection_id", sa.String(40), sa.ForeignKey("collections.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    )
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_FTS if dialect == "sqlite" else POSTGRES_FTS if dialect == "postgresql" else []:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE IF EXISTS collection_chunks_fts")
    op.drop_table("collection_batches")
    op.drop_table("collection_chunks")
    op.drop_table("collection_documents")
    op.drop_table("collections")
