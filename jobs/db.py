"""Engines, sessions and migrations for the job database (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from corral.settings import Settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def engine_for(url: str) -> Engine:
    """One engine per URL per process (engines pool connections; they are made to be shared)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _make_engine(url)
            _engines[url] = engine
        return engine


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            # The API and the workers write concurrently: WAL lets readers run beside the one writer.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA mmap_size=2147418112")  # pages from a memory map, not read()s (bench/README.md, Collections)
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def sessions(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(engine_for(settings.database), expire_on_commit=False)


def alembic_config(settings: Settings) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = settings.database
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``corral db upgrade``; also run by ``corral up``/``serve``), then
    set up the pgvector search index where the database offers the extension (:mod:`jobs.search`)."""
    from alembic import command

    from jobs.collection_search import ensure_collection_index
    from jobs.search import ensure_vector_index

    url = settings.database
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
    if revision == "head":
        with engine_for(url).begin() as conn:
            ensure_vector_index(conn)
            ensure_collection_index(conn)
