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
from jobs.db import upgrade
from jobs.models import Base

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
NO_POSTGRES = not POSTGRES_URL.startswith("postgresql")


@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(NO_POSTGRES, reason="TEST_DATABASE_URL is not PostgreSQL"))],
)
def test_migrations_match_the_models(tmp_path: Path, backend: str) -> None:
    url = POSTGRES_URL if backend == "postgresql" else f"sqlite:///{tmp_path / 'migrated.db'}"
    schema = None
    engine = create_engine(url)
    if backend == "postgresql":  # a schema of our own, so the shared test database is left alone
        schema = f"migrations_{os.getpid()}"
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
        engine = create_engine(url)
    try:
        upgrade(Settings(home=tmp_path, database_url=url))
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
        if schema:
            with create_engine(POSTGRES_URL).begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
