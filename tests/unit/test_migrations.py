"""The Alembic migrations build exactly the tables the SQLAlchemy models describe, on SQLite and (when
``TEST_DATABASE_URL`` is set) PostgreSQL: a column added to a model without a migration would be a 500 on
every existing install."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from corral.settings import Settings
from harness.stack import drop_everything
from jobs.db import upgrade
from jobs.models import Base
from jobs.search import VECTOR_TABLE
from tests.helpers import HAVE_PGSERVER

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
NO_POSTGRES = not POSTGRES_URL.startswith("postgresql")
COLLECTION_VECTORS = "collection_vectors"  # jobs/collection_search.py


DERIVED_INDEXES = {"ix_collection_chunks_tsv"}


def not_the_vector_index(name: str | None, type_: str, parent: dict[str, str | None]) -> bool:
    """Search indexes the models do not describe: ``item_vectors`` and the collections' vectors (pgvector's, made
    beside the migrations where the extension exists), and keyword search over chunk text (SQLite's FTS5 table
    and its shadow tables, PostgreSQL's generated ``tsv`` column and its GIN index)."""
    if type_ == "table":
        return name not in (VECTOR_TABLE, COLLECTION_VECTORS) and not (name or "").startswith("collection_chunks_fts")
    if type_ == "column":
        return not (name == "tsv" and parent.get("table_name") == "collection_chunks")
    return name not in DERIVED_INDEXES


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.skipif(NO_POSTGRES, reason="TEST_DATABASE_URL is not PostgreSQL")),
        pytest.param("pgvector", marks=pytest.mark.skipif(not HAVE_PGSERVER, reason="pgserver is not installed")),
    ],
)
def test_migrations_match_the_models(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "pgvector":
        url = request.getfixturevalue("pgvector_url")
    elif backend == "postgresql":
        url = POSTGRES_URL
    else:
        url = f"sqlite:///{tmp_path / 'migrated.db'}"
    schema = None
    engine = create_engine(url)
    if backend == "pgvector":  # the private server's own database: start from nothing
        drop_everything(engine)
    if backend == "postgresql":  # a schema of our own, so the shared test database is left alone
        schema = f"migrations_{os.getpid()}"
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
        engine.dispose()
        engine = create_engine(url)
    try:
        upgrade(Settings(home=tmp_path, database_url=url))
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_name": not_the_vector_index})
            diff = compare_metadata(context, Base.metadata)
            postgres = conn.dialect.name == "postgresql"
            indexed = postgres and conn.scalar(text(f"SELECT to_regclass('{VECTOR_TABLE}')"))
            pgvector = postgres and conn.scalar(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"))
        assert diff == []
        assert bool(indexed) == bool(pgvector)  # the search index exists exactly where pgvector does
        if backend == "pgvector":
            assert pgvector
    finally:
        engine.dispose()
        if schema:
            dropper = create_engine(POSTGRES_URL)
            with dropper.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            dropper.dispose()
