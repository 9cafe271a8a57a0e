"""Session fixtures: real Redis, a real worker process and a real API server with the real tiny model.

Redis: the one ``REDIS_URL`` names (CI and dev machines run one), else a private ``redis-server`` started here.
Database: ``TEST_DATABASE_URL`` (PostgreSQL in CI), else SQLite in the session's temporary directory.

``make test`` runs the suite in several processes (pytest-xdist, ``-n``, whole files to each): most of a test's
time is spent waiting on the processes it started, so one pytest keeps a 2-core machine a third busy.  Each
xdist worker is a session of its own, with its own stack, and shares nothing with its peers (see
:func:`pytest_configure`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.processes import redis_or_private
from harness.stack import Stack, fresh_database
from tests.helpers import Registry, child_processes, clean_redis, make_settings, with_db

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under `pytest -n N`; None otherwise


def worker_schema() -> str | None:
    """The PostgreSQL schema this xdist worker keeps its tables in (None: not under xdist)."""
    return f"corral_test_{XDIST_WORKER}" if XDIST_WORKER else None


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker shares nothing with its peers.  Redis: the first keeps ``REDIS_URL``'s server, the others
    start a private one each (a test that flushes its Redis or cuts it off must not touch a peer's jobs; sixteen
    database numbers are too few to share out).  PostgreSQL: a schema of ``TEST_DATABASE_URL`` of its own, made
    the default of every connection of this process and of the workers and servers it starts by libpq's
    ``PGOPTIONS`` (a test that names its own schema in the URL still gets that one)."""
    schema = worker_schema()
    if schema is None:
        return
    if XDIST_WORKER != "gw0":
        os.environ.pop("REDIS_URL", None)
    url = os.environ.get("TEST_DATABASE_URL", "")
    if url.startswith("postgresql"):
        _create_schema(url, schema)
        os.environ["PGOPTIONS"] = f"-c search_path={schema}"


def _create_schema(url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corral")


@pytest.fixture(scope="session")
def redis_url(session_dir: Path) -> Iterator[str]:
    """The running Redis named by REDIS_URL (which must answer), or a private one for the session."""
    with redis_or_private(os.environ.get("REDIS_URL"), session_dir / "redis", strict=True) as url:
        yield url


@pytest.fixture(scope="session")
def models_dir(session_dir: Path) -> Path:
    path = session_dir / "models"
    assert ensure_defaults(ModelStore(path)) == ["smollm2:135m", "all-minilm:l6-v2"]
    return path


@pytest.fixture(scope="session")
def pgvector_url() -> Iterator[str]:
    """A private PostgreSQL 16 with the pgvector extension, from the ``pgserver`` package (tests that use it are
    skipped where it is not installed: see HAVE_PGSERVER)."""
    import pgserver

    from jobs.db import engine_for

    # Not under pytest's temporary root: under root the server runs as another user, and each pytest process
    # that starts makes that root 0700 again (harness/postgres.py says more)
    data = Path(tempfile.mkdtemp(prefix="corral-pgvector-"))
    data.chmod(0o755)
    server = pgserver.get_server(data, cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    schema = worker_schema()
    if schema is not None and "PGOPTIONS" in os.environ:  # PGOPTIONS names it on every server this process reaches
        _create_schema(url, schema)
    try:
        yield url
    finally:
        engine_for(url).dispose()
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


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


@pytest.fixture(scope="session")
def reranker(base_url: str, session_dir: Path) -> tuple[str, Path]:
    """A tiny BERT cross-encoder (tests/ggufs.py ``cross_encoder``), created on the session's stack as a user
    creates one from a GGUF: its blob uploaded, then ``/api/create`` with ``files``.  (name, the GGUF's path)."""
    import hashlib

    import httpx

    from tests.ggufs import cross_encoder

    path = cross_encoder(session_dir / "cross-encoder.gguf")
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    uploaded = httpx.post(f"{base_url}/api/blobs/{digest}", content=path.read_bytes(), timeout=60)
    assert uploaded.status_code in (200, 201), uploaded.text  # 200: the store has it (a test pulled the same file)
    r = httpx.post(f"{base_url}/api/create", timeout=120,
                   json={"model": "tiny-reranker", "files": {path.name: digest}, "stream": False})
    assert r.status_code == 200, r.text
    return "tiny-reranker", path


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every process a test started (workers, API servers, Redis, `corral up`) must be gone once the fixtures are
    torn down, pass or fail: one left behind fails the run, and is killed.  Under xdist each worker checks its
    own; the controller's children are those workers, still running when it gets here."""
    if XDIST_WORKER is None and getattr(session.config.option, "numprocesses", None):
        return
    left = child_processes(os.getpid())
    if left:
        for pid, _ in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        print("\nprocesses left running by the tests (killed):\n" + "\n".join(f"  {pid} {cmd}" for pid, cmd in left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture()
def local_registry() -> Iterator[Registry]:
    """A model registry in Ollama's URL layout on 127.0.0.1: tests pull from it, never from a hub."""
    served = Registry()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()
