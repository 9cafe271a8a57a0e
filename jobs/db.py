"""Engines, sessions and migrations for the job database (SQLite by default, PostgreSQL in production), and how
a process rides out a PostgreSQL restart (issue #38).

A restarted or lost server shows itself as a refused or timed-out connect, a session the server ended
("terminating connection due to administrator command"), or a server that is up but not yet serving ("the
database system is starting up").  :func:`unreachable` tells those apart from every other database error; the
API answers them with a 503 and ``Retry-After`` (:class:`~corral.errors.DatabaseUnavailable`, api/errors.py),
and a worker retries the transaction (:func:`transaction`) for a bounded time instead of failing the items.
The engine finds a dead server fast: a pooled connection is pinged before use (so one the restart dropped is
never reused), a connect gives up after :data:`CONNECT_TIMEOUT` seconds, and TCP keepalives plus a TCP user
timeout end a session whose host went away without a word, where the kernel would wait for minutes.

A status poll is the one read clients repeat, so it does not pay for that ping: :func:`poll` reads on a pool of
its own (:func:`poll_engine_for`) and finds a dead connection by using it instead (see there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from corral.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_engines: dict[tuple[str, bool], Engine] = {}  # (url, for polls) -> its engine
_lock = threading.Lock()

# libpq's connection options for PostgreSQL: seconds a connect may take (a host that drops packets fails in this
# time, not the kernel's two minutes), and keepalives that find a silent peer in idle + interval * count seconds.
CONNECT_TIMEOUT = 5
POSTGRES_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,  # ms: sent data unacknowledged this long ends the session (a lost host)
}
# SQLSTATEs of a server that ended the session or will not take one yet: class 08 (connection exceptions), and
# admin_shutdown (a fast or immediate stop), crash_shutdown (a backend crashed: every session ends),
# cannot_connect_now (starting up, shutting down, in recovery).
_UNREACHABLE_STATES = ("57P01", "57P02", "57P03")
# How long a worker retries a transaction across an outage before the error goes up (and the chunk is released).
RETRY_SECONDS = 180.0


# The pool of status polls, beside an API process's main pool (10 + 20): a poll holds its connection for one
# statement, so few serve many; a burst past them waits for one rather than opening more, for as long as a
# connect may take, then is answered 503 (api/errors.py).
POLL_POOL_SIZE, POLL_MAX_OVERFLOW = 5, 5


def engine_for(url: str) -> Engine:
    """One engine per URL per process (engines pool connections; they are made to be shared)."""
    return _shared(url, polls=False)


def poll_engine_for(url: str) -> Engine:
    """The engine of :func:`poll`.  PostgreSQL: a pool of its own whose connections are in autocommit (a read sends
    no BEGIN and no ROLLBACK) and are not pinged before use.  SQLite: :func:`engine_for`'s (a file has no round
    trips to save, and does not restart)."""
    return _shared(url, polls=url.startswith("postgresql"))


def _shared(url: str, *, polls: bool) -> Engine:
    with _lock:
        engine = _engines.get((url, polls))
        if engine is None:
            engine = _make_engine(url, polls=polls)
            _engines[(url, polls)] = engine
        return engine


def _make_engine(url: str, *, polls: bool = False) -> Engine:
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
    connect_args = dict(POSTGRES_CONNECT_ARGS) if url.startswith("postgresql") else {}
    if polls:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=POLL_POOL_SIZE,
                               max_overflow=POLL_MAX_OVERFLOW, pool_timeout=CONNECT_TIMEOUT,
                               connect_args=connect_args)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)
    if url.startswith("postgresql"):
        event.listen(engine, "connect", _server_side_session)
    return engine


# The server's end of each session.  The client's keepalives above let a worker notice a lost server; these let
# the server notice a lost client: a host that dies between a statement and its COMMIT leaves the session's row
# locks held until the server's TCP keepalive gives up (two hours by default), and the worker that takes the
# re-queued chunk over waits on them that long.  With these the session ends within about 25 s.  Set per session,
# not as libpq ``options`` (which would replace a PGOPTIONS the operator or the test suite sets).
SERVER_SIDE_SETTINGS = (
    "SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5", "SET tcp_keepalives_count = 3",
    "SET tcp_user_timeout = 20000",
    # a client that is silent inside a transaction: a frozen host, or one lost behind a proxy or pooler that
    # keeps the server's side of the connection alive (corral's own transactions never wait on anything)
    "SET idle_in_transaction_session_timeout = '30s'",
)


def _server_side_session(conn: Any, _: Any) -> None:
    with conn.cursor() as cur:
        for statement in SERVER_SIDE_SETTINGS:
            cur.execute(statement)
    conn.commit()


def unreachable(exc: BaseException) -> bool:
    """Whether a database error means the server is out of reach or restarting (try again shortly), as opposed
    to a query's own failure (a constraint, a deadlock, a statement timeout: a retry of the same request would
    not help, or would be wrong).  SQLite's errors never count: a file does not restart."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:  # SQLAlchemy's own reading: the connection is gone (and the pool's too)
        return True
    orig = exc.orig
    if not type(orig).__module__.startswith(("psycopg", "psycopg2")):
        return False
    if type(orig).__name__ == "InterfaceError":  # "the connection is closed"
        return True
    if not any(cls.__name__ == "OperationalError" for cls in type(orig).__mro__):
        return False  # the driver's class tree, by name: psycopg is an optional extra (corral[postgres])
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    # no SQLSTATE: libpq's own failure (refused, timed out, "server closed the connection unexpectedly")
    return state is None or str(state).startswith("08") or state in _UNREACHABLE_STATES


def reason(exc: BaseException) -> str:
    """A short, address-free word on why the database is unreachable, for a client's error message."""
    orig = getattr(exc, "orig", None) or exc
    return type(orig).__name__


def transaction(sessions_: Callable[[], Session], work: Callable[[Session], T], what: str, *,
                retry_for: float = RETRY_SECONDS) -> T:
    """``work(session)`` in a fresh session, committed; retried in a new session, with backoff, while the
    database is :func:`unreachable` (for up to ``retry_for`` seconds; then the error goes up).

    ``work`` must be safe to run again after a commit whose outcome is unknown (the server went away between
    the COMMIT and its answer, so it may have committed): every transition of :mod:`jobs.transitions` that the
    worker retries is a conditional ``UPDATE`` that its own repeat finds already done (a claim under the same
    attempt token, a result written only while that claim holds)."""
    def once() -> T:
        with sessions_() as session:
            result = work(session)
            session.commit()
            return result

    return retrying(once, what, retry_for=retry_for)


def read_after_commit(read: Callable[[], T], what: str, *, retry_for: float = 30.0) -> T:
    """A reply read after the commit that stored what it describes (a batch, a document), retried while the
    database is :func:`unreachable`: a 503 now would make the client's retry store a second one."""
    return retrying(read, what, retry_for=retry_for)


def retrying(call: Callable[[], T], what: str, *, retry_for: float) -> T:
    """``call()``, called again with backoff (0.1 s doubling to 2 s) while it fails because the database is
    :func:`unreachable`, for up to ``retry_for`` seconds; a line when the outage starts and one when it ends."""
    deadline = time.monotonic() + retry_for
    delay, since = 0.1, None
    while True:
        try:
            result = call()
        except DBAPIError as exc:
            if not unreachable(exc) or time.monotonic() + delay > deadline:
                raise
            if since is None:
                since = time.monotonic()
                log.warning("the database is unreachable (%s) during %s; retrying for up to %.0f s",
                            reason(exc), what, retry_for)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if since is not None:
            log.warning("the database answers again after %.1f s: %s done", time.monotonic() - since, what)
        return result


def poll(settings: Settings, read: Callable[[Session], T]) -> T:
    """``read(session)`` for a status poll, on a connection of :func:`poll_engine_for`: on PostgreSQL it costs the
    statements ``read`` runs and nothing else, where a session of :func:`sessions` adds three round trips (the
    pool's ping, BEGIN, ROLLBACK).  Without BEGIN each statement is its own snapshot, so a read whose parts must
    agree makes them one statement.

    The ping is what found a connection that a server restart dropped; here the read finds it: the driver's error
    is one SQLAlchemy reads as a disconnect (``is_disconnect``: ``connection_invalidated``), which also invalidates
    every connection the pool held, and the read runs once more on a new connection.  So the first poll after a
    restart answers as every other does.  A connect that fails is not retried (the server is down or starting:
    the API's 503, :func:`unreachable`), nor is a second failure, nor a query's own error.  Only a read may come
    here: one that wrote could not tell whether its lost statement had run."""
    engine = poll_engine_for(settings.database)
    with engine.connect() as conn:  # a connect that fails goes up from here
        try:
            return _read(conn, read)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            log.info("a pooled database connection was gone (%s); the poll reads again on a new one", reason(exc))
    with engine.connect() as conn:
        return _read(conn, read)


def _read(conn: Connection, read: Callable[[Session], T]) -> T:
    with Session(conn) as session:
        return read(session)


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
