"""What a job status poll costs (issue #38): on PostgreSQL ``GET /api/jobs/<id>`` is one round trip, where a
session's ping, BEGIN, two reads and ROLLBACK took five (511 ms a poll over a 50 ms link), and the first poll after
the server dropped every pooled session, as a restart does, still answers as usual.

Round trips are counted in libpq's own trace of the protocol: every answer of the server ends with one
``ReadyForQuery``, so their number is the number of times the client waited.  The trace covers every connection
any pool of this process opens, so it counts what the route costs, whichever engine it reads through.  These need
``TEST_DATABASE_URL`` to be PostgreSQL; which failures :func:`jobs.db.poll` reads again is tested without one.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from corral.settings import Settings
from jobs.db import engine_for, poll, poll_engine_for, sessions, upgrade
from jobs.models import Chunk, Item, Job, WebhookDelivery, utcnow
from tests.helpers import make_settings

T = TypeVar("T")
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
PREPARE_THRESHOLD = 5  # psycopg's default
on_postgres = pytest.mark.skipif(not POSTGRES_URL.startswith("postgresql"), reason="TEST_DATABASE_URL is not PostgreSQL")


@dataclass
class Trip:
    """What one call sent: its round trips (answers that ended in ReadyForQuery), the statements, new connections."""

    round_trips: int
    statements: list[str]
    connections_opened: int


@dataclass
class ProtocolTrace:
    """libpq's trace (``PQtrace``) of the connections of every pool in this process, turned on around a call."""

    directory: Path
    connections: list[Any] = field(default_factory=list)
    _fd: int | None = None

    def __post_init__(self) -> None:
        event.listen(Pool, "connect", self._opened)

    def close(self) -> None:
        event.remove(Pool, "connect", self._opened)

    def _opened(self, dbapi_connection: Any, _record: Any) -> None:
        self.connections.append(dbapi_connection)
        if self._fd is not None:
            self._trace(dbapi_connection)

    def _trace(self, dbapi_connection: Any) -> None:
        from psycopg.pq import Trace

        assert self._fd is not None
        # libpq writes through a FILE of its own, flushed when the trace is turned off; it gets a copy of the fd
        dbapi_connection.pgconn.trace(os.dup(self._fd))
        dbapi_connection.pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)

    def during(self, call: Callable[[], T]) -> tuple[T, Trip]:
        path = self.directory / f"trace-{uuid.uuid4().hex}.txt"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        known = len(self.connections)
        for conn in self.connections:
            if not conn.closed:
                self._trace(conn)
        try:
            result = call()
        finally:
            for conn in self.connections:
                if not conn.closed:
                    conn.pgconn.untrace()
            os.close(self._fd)
            self._fd = None
        messages = [line.split("\t") for line in path.read_text().splitlines() if line[:2] in ("F\t", "B\t")]
        ready = sum(1 for m in messages if m[0] == "B" and m[2] == "ReadyForQuery")
        statements = [sql(m) for m in messages if m[0] == "F" and m[2] in ("Query", "Parse")]
        return result, Trip(ready, statements, len(self.connections) - known)


def sql(message: list[str]) -> str:
    """The start of the SQL a traced Query (``"BEGIN"``) or Parse (``"<name>" "SELECT ..." ...``) message sends."""
    quoted = message[3].strip()
    if message[2] == "Parse":
        quoted = quoted.split(" ", 1)[1]  # after the prepared statement's name ("" when unnamed)
    return quoted.strip('"')[:60]


@pytest.fixture()
def trace(tmp_path: Path) -> Iterator[ProtocolTrace]:
    traced = ProtocolTrace(tmp_path)
    try:
        yield traced
    finally:
        traced.close()


@pytest.fixture()
def pg_settings(tmp_path: Path, models_dir: Path) -> Iterator[Settings]:
    """The API's settings over a schema of this test's own in ``TEST_DATABASE_URL``'s database (other tests may
    share that database), with the tables migrated."""
    schema = f"corral_poll_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    try:
        settings = make_settings(tmp_path / "home", None, models_dir, database_url=url)
        upgrade(settings)
        yield settings
    finally:
        engine_for(url).dispose()
        poll_engine_for(url).dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def add_job(session: Session, job_id: str, status: str, states: list[str], **fields: Any) -> None:
    """A job with one chunk (not done) and an item in each of ``states``, 3 prompt tokens each, 5 generated by
    each succeeded one."""
    fields.setdefault("meta", {})
    session.add(Job(id=job_id, kind="generate", model="smollm2", model_digest="digest", options={}, status=status,
                    chunk_size=len(states), item_count=len(states), **fields))
    session.flush()
    session.add(Chunk(id=f"{job_id}-chunk", job_id=job_id, model_digest="digest", seq=0,
                      state="running" if status == "running" else "queued"))
    session.flush()
    for seq, state in enumerate(states):
        session.add(Item(job_id=job_id, chunk_id=f"{job_id}-chunk", seq=seq, input={"prompt": str(seq)}, state=state,
                         attempts=0, prompt_tokens=3, completion_tokens=5 if state == "succeeded" else None))
    session.commit()


@pytest.fixture()
def polled(pg_settings: Settings, trace: ProtocolTrace) -> FlaskClient:
    """The API over three jobs (one running, one queued behind it, one with a webhook) and an OpenAI and an
    Anthropic batch, each running and ended; every connection it opens is one the trace knows."""
    from api import create_app

    with sessions(pg_settings)() as session:
        add_job(session, "job_running", "running", ["succeeded", "succeeded", "failed", "running", "pending"])
        add_job(session, "job_queued", "queued", ["pending", "pending"])
        add_job(session, "job_hooked", "running", ["succeeded", "pending"], webhook_url="http://127.0.0.1:9/hook")
        openai = {"openai_batch": {"endpoint": "/v1/chat/completions", "input_file_id": "file-x",
                                   "completion_window": "24h"}}
        add_job(session, "batch_running", "running", ["succeeded", "pending"], meta=openai)
        add_job(session, "batch_ended", "completed", ["succeeded", "failed"], meta=openai, finished_at=utcnow())
        anthropic = {"anthropic_batch": {"total": 2}}
        add_job(session, "msgbatch_running", "running", ["succeeded", "pending"], meta=anthropic)
        add_job(session, "msgbatch_ended", "completed", ["succeeded", "failed"], meta=anthropic, finished_at=utcnow())
        session.add(WebhookDelivery(id="whd_1", job_id="job_hooked", event="job.started", url="http://127.0.0.1:9/hook",
                                    payload={}, status="delivered", attempts=1))
        session.commit()
    engine_for(pg_settings.database).dispose()  # as the app starts, no connection is open
    client = create_app(pg_settings).test_client()
    # psycopg prepares a statement on its fifth run on a connection, which costs that run one round trip more;
    # these polls take the status statement past it, so what a test counts is what a poll costs from then on.
    for _ in range(PREPARE_THRESHOLD):
        get(client, "/api/jobs/job_running")
    return client


def get(client: FlaskClient, path: str) -> dict[str, Any]:
    resp = client.get(path, headers={"anthropic-version": "2023-06-01"} if "/messages/" in path else {})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body: dict[str, Any] = resp.get_json()
    return body


@on_postgres
def test_a_status_poll_is_one_round_trip(polled: FlaskClient, trace: ProtocolTrace) -> None:
    first = get(polled, "/api/jobs/job_running")
    assert first["counts"] == {"total": 5, "pending": 1, "running": 1, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert first["tokens"] == {"prompt": 15, "completion": 10} and first["queue_position"] is None
    trips = []
    for _ in range(5):
        view, trip = trace.during(lambda: get(polled, "/api/jobs/job_running"))
        assert view == first
        trips.append(trip)
    # One statement a poll, on a pooled connection: no ping, no BEGIN, no ROLLBACK
    assert [(t.round_trips, t.connections_opened) for t in trips] == [(1, 0)] * 5, trips
    sent = [s.upper() for t in trips for s in t.statements]
    assert not [s for s in sent if s.startswith(("BEGIN", "ROLLBACK", "COMMIT", ";", "SELECT 1"))], sent  # ";": the ping


@on_postgres
def test_a_queued_job_and_a_job_with_a_webhook_cost_no_more_than_two(polled: FlaskClient, trace: ProtocolTrace) -> None:
    get(polled, "/api/jobs/job_running")  # the poll's pool holds a connection
    queued, trip = trace.during(lambda: get(polled, "/api/jobs/job_queued"))
    assert queued["status"] == "queued" and queued["queue_position"] == 1  # job_running's chunk is ahead of it
    assert queued["counts"]["pending"] == 2
    assert trip.round_trips == 1, trip
    hooked, trip = trace.during(lambda: get(polled, "/api/jobs/job_hooked"))
    assert [d["id"] for d in hooked["webhook"]["deliveries"]] == ["whd_1"]
    assert trip.round_trips == 2, trip  # the deliveries are a second statement


@on_postgres
def test_the_batch_routes_poll_in_one_round_trip(polled: FlaskClient, trace: ProtocolTrace) -> None:
    """The OpenAI and Anthropic batch routes read a batch as a job's status is read; an ended OpenAI batch adds
    its result files (a second statement), made once in a session of their own on its first view."""
    get(polled, "/api/jobs/job_running")  # the poll's pool holds a connection
    running, trip = trace.during(lambda: get(polled, "/v1/batches/batch_running"))
    assert running["status"] == "in_progress" and running["request_counts"] == {"total": 2, "completed": 1, "failed": 0}
    assert trip.round_trips == 1, trip
    first = get(polled, "/v1/batches/batch_ended")  # makes its output and error files
    assert first["status"] == "completed" and first["output_file_id"] and first["error_file_id"]
    ended, trip = trace.during(lambda: get(polled, "/v1/batches/batch_ended"))
    assert ended == first and trip.round_trips == 2, trip
    for ident, status in (("msgbatch_running", "in_progress"), ("msgbatch_ended", "ended")):
        view, trip = trace.during(partial(get, polled, f"/v1/messages/batches/{ident}"))
        assert view["processing_status"] == status and trip.round_trips == 1, (view, trip)
    assert view["request_counts"] == {"processing": 0, "succeeded": 1, "errored": 1, "canceled": 0, "expired": 0}


@on_postgres
def test_the_first_poll_after_the_server_dropped_its_sessions_answers(
        polled: FlaskClient, trace: ProtocolTrace, pg_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """A restart ends every session the pools hold; here they are ended one by one (``pg_terminate_backend``,
    SQLSTATE 57P01 as a fast shutdown sends), so no other test's sessions are touched.  Without a ping the poll
    finds its connection gone when it reads, and reads again on a new one: a 200, not a 503 or a 500."""
    before = get(polled, "/api/jobs/job_running")
    ours = [conn.info.backend_pid for conn in trace.connections if not conn.closed]
    assert ours
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        for pid in ours:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    with caplog.at_level(logging.INFO, logger="jobs.db"):
        after, trip = trace.during(lambda: get(polled, "/api/jobs/job_running"))
    assert after["counts"] == before["counts"] and after["status"] == "running"
    assert "the poll reads again on a new one" in caplog.text
    assert trip.connections_opened == 1, trip
    again, trip = trace.during(lambda: get(polled, "/api/jobs/job_running"))
    assert again["counts"] == before["counts"] and trip.connections_opened == 0 and trip.round_trips == 1, trip
    # the main pool's ping finds its own connection gone and takes a new one, as before
    assert polled.post("/api/jobs/job_missing/cancel").status_code == 404


# -- which failures a poll reads again (no server needed) ------------------------------------------------------------

def dropped() -> OperationalError:
    """The error SQLAlchemy raises when a statement finds its connection gone (and invalidates the pool)."""
    return OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"), connection_invalidated=True)


def test_a_poll_reads_again_once_when_its_connection_was_gone(settings: Settings) -> None:
    calls: list[int] = []

    def read(session: Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise dropped()
        return int(session.scalar(text("SELECT 7")) or 0)

    assert poll(settings, read) == 7 and len(calls) == 2


def test_a_poll_reads_no_third_time_nor_again_after_a_querys_own_error(settings: Settings) -> None:
    calls: list[int] = []

    def gone(_: Session) -> None:
        calls.append(1)
        raise dropped()

    with pytest.raises(OperationalError):
        poll(settings, gone)
    assert len(calls) == 2
    calls.clear()

    def broken(session: Session) -> None:
        calls.append(1)
        session.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(OperationalError) as exc:
        poll(settings, broken)
    assert not exc.value.connection_invalidated and len(calls) == 1


def test_a_large_open_jobs_statement_leaves_its_counts_to_the_cache(settings: Settings) -> None:
    """The poll's one statement counts a job's items unless its counts come from Redis (a job of
    COUNTS_CACHED_FROM items or more, still open): then it skips the count in SQL too, and once the job has
    ended it counts again."""
    from jobs.status import COUNTS_CACHED_FROM, status_query

    job_id = f"job_{uuid.uuid4().hex[:12]}"
    with sessions(settings)() as session:
        add_job(session, job_id, "running", ["succeeded", "pending"])
        session.get_one(Job, job_id).item_count = COUNTS_CACHED_FROM  # as if it had that many: the rule reads the row
        session.commit()
        assert [row[2:] for row in session.execute(status_query(), {"job_id": job_id})] == [(None, None, None, None)]
        session.get_one(Job, job_id).status = "completed"
        session.commit()
        counted = sorted(row[2:] for row in session.execute(status_query(), {"job_id": job_id}))
    assert counted == [("pending", 1, 3, None), ("succeeded", 1, 3, 5)]
