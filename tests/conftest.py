"""Session fixtures: real Redis, a real worker process and a real API server with the real tiny model.

Redis: the one ``REDIS_URL`` names (CI and dev machines run one), else a private ``redis-server`` started here.
Database: ``TEST_DATABASE_URL`` (PostgreSQL in CI), else SQLite in the session's temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine

from corral.catalog import ensure_defaults
from corral.launcher import free_port
from corral.settings import Settings
from corral.store import ModelStore
from tests.stack import Stack, clean_redis, redis_server_for_tests, with_db

MODEL = "smollm2"
HAVE_PGSERVER = importlib.util.find_spec("pgserver") is not None


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corral")


@pytest.fixture(scope="session")
def redis_url(session_dir: Path) -> Iterator[str]:
    yield from redis_server_for_tests(session_dir / "redis")


@pytest.fixture(scope="session")
def models_dir(session_dir: Path) -> Path:
    path = session_dir / "models"
    assert ensure_defaults(ModelStore(path)) == ["smollm2:135m", "all-minilm:l6-v2"]
    return path


def make_settings(home: Path, redis_url: str, models_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "redis_url": redis_url,
        "models_dir": models_dir,
        "host": f"127.0.0.1:{free_port()}",
        "database_url": os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{home / 'corral.db'}",
        "heartbeat_ttl": 3.0,
        "queue_timeout": 120.0,
        "reconcile_interval": 2.0,
        "chunk_size": 4,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def fresh_database(settings: Settings) -> None:
    """Drop whatever an earlier run left in a shared test database, then apply the migrations."""
    from jobs.db import engine_for, upgrade

    if not settings.database.startswith("sqlite"):
        drop_everything(engine_for(settings.database))
    upgrade(settings)


def drop_everything(engine: Engine) -> None:
    """Empty a database of corral's tables: pgvector's index of job_items (if any), the models', Alembic's."""
    from sqlalchemy import text

    from jobs.models import Base
    from jobs.search import VECTOR_TABLE

    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {VECTOR_TABLE}"))
        Base.metadata.drop_all(conn)
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))


@contextmanager
def own_stack(settings: Settings, home: Path, redis_db: int, **overrides: object) -> Iterator[Stack]:
    """A worker and an API server of their own: another Redis database and SQLite file, settings overridden."""
    url = with_db(settings.redis, redis_db)
    clean_redis(url)
    own = make_settings(home, url, settings.models_path, **{"database_url": f"sqlite:///{home / 'own.db'}", **overrides})
    fresh_database(own)
    try:
        with Stack(own, home / "logs").running() as stack:
            yield stack
    finally:
        clean_redis(url)


@pytest.fixture(scope="session")
def pgvector_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private PostgreSQL 16 with the pgvector extension, from the ``pgserver`` package (tests that use it are
    skipped where it is not installed: see HAVE_PGSERVER)."""
    import pgserver

    from jobs.db import engine_for

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield url
    finally:
        engine_for(url).dispose()
        server.cleanup()


@pytest.fixture(scope="session")
def settings(session_dir: Path, redis_url: str, models_dir: Path) -> Settings:
    clean_redis(redis_url)
    s = make_settings(session_dir / "home", redis_url, models_dir)
    fresh_database(s)
    return s


@pytest.fixture(scope="session")
def stack(settings: Settings, session_dir: Path) -> Iterator[Stack]:
    """One worker and one API server for the whole session."""
    with Stack(settings, session_dir / "logs").running() as s:
        yield s


@pytest.fixture(scope="session")
def base_url(stack: Stack) -> str:
    return stack.base_url


@pytest.fixture()
def app(settings: Settings) -> Flask:
    """An in-process API (no server) for tests that need no worker: validation, listing, CORS."""
    from api import create_app

    return create_app(settings)


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture()
def isolated(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own: another Redis database and its own SQLite file, so killing its worker or flushing
    its Redis cannot disturb the session's stack (whose reconciler would otherwise see the same jobs)."""
    url = with_db(settings.redis, 1)
    clean_redis(url)
    own = make_settings(
        tmp_path / "home", url, settings.models_path, heartbeat_ttl=2.0, queue_timeout=4.0,
        database_url=f"sqlite:///{tmp_path / 'isolated.db'}", reconcile_interval=1.0, chunk_size=2,
    )
    fresh_database(own)
    stack = Stack(own, tmp_path / "logs")
    try:
        yield stack
    finally:
        stack.stop()
        clean_redis(url)


@pytest.fixture()
def spy_llama_decode(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[Any], None]], None]:
    """Install ``record(batch)`` in front of every real ``llama_decode`` of this process (the call still runs,
    on the caller's thread), for tests that check what a worker's loops hand llama.cpp."""

    def install(record: Callable[[Any], None]) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as bindings

        real = bindings.llama_decode

        def spying(ctx: Any, batch: Any) -> int:
            record(batch)
            return int(real(ctx, batch))

        monkeypatch.setattr(bindings, "llama_decode", spying)
        monkeypatch.setattr(llama_cpp, "llama_decode", spying)

    return install
