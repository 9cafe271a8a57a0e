"""Riding out a PostgreSQL restart (jobs/db.py, issue #38), without a server: which database errors are an outage
(a refused connect to a real closed port is one; SQLite's errors and a query's own failure are not), how long a
worker's transaction retries one, and that the transitions a worker retries are safe to run twice after a commit
whose outcome it could not learn."""

from __future__ import annotations

import os
import time
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from harness.processes import free_port
from jobs import transitions
from jobs.db import CONNECT_TIMEOUT, engine_for, reason, transaction, unreachable
from jobs.models import Chunk, ChunkState, Item, ItemState, Job, JobStatus

psycopg = pytest.importorskip("psycopg")
_ids = count()


def make_job(session: Session, items: int = 4, chunk_size: int = 2) -> tuple[str, list[str]]:
    """A queued job of ``items`` pending items in chunks of ``chunk_size``, as submission writes it."""
    job_id = f"job_{next(_ids)}"
    session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, status=JobStatus.QUEUED,
                    chunk_size=chunk_size, item_count=items, meta={}))
    chunks = [f"chunk_{next(_ids)}" for _ in range(0, items, chunk_size)]
    for n, chunk_id in enumerate(chunks):
        session.add(Chunk(id=chunk_id, job_id=job_id, model_digest="d", seq=n, state=ChunkState.QUEUED))
    session.flush()
    for seq in range(items):
        session.add(Item(job_id=job_id, chunk_id=chunks[seq // chunk_size], seq=seq, input={"prompt": str(seq)},
                         state=ItemState.PENDING, attempts=0))
    session.commit()
    return job_id, chunks


def closed_port_url() -> str:
    """A PostgreSQL URL on a loopback port nothing listens on: every connect is refused, as during a restart."""
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"


def refused() -> DBAPIError:
    engine = engine_for(closed_port_url())
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("a closed port answered")


def test_a_refused_connect_is_an_outage_and_its_reason_names_no_address() -> None:
    started = time.monotonic()
    exc = refused()
    assert time.monotonic() - started < CONNECT_TIMEOUT  # refused at once, not timed out
    assert unreachable(exc)
    assert reason(exc) == "OperationalError" and "127.0.0.1" not in reason(exc)


def test_sqlite_errors_and_a_querys_own_failure_are_not_an_outage(session: Session) -> None:
    with pytest.raises(DBAPIError) as missing:
        session.execute(text("SELECT * FROM no_such_table"))
    session.rollback()
    assert type(missing.value).__name__ == "OperationalError" and not unreachable(missing.value)
    job_id, _ = make_job(session, items=1)
    session.expunge_all()
    session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, status=JobStatus.QUEUED,
                    chunk_size=1, item_count=1, meta={}))
    with pytest.raises(IntegrityError) as duplicate:
        session.commit()
    session.rollback()
    assert not unreachable(duplicate.value)
    assert not unreachable(ValueError("not a database error"))


def test_a_transaction_retries_an_outage_for_its_budget_then_raises() -> None:
    engine = engine_for(closed_port_url())
    calls = []

    def work(session: Session) -> int:
        calls.append(time.monotonic())
        return int(session.scalar(text("SELECT 1")) or 0)

    started = time.monotonic()
    with pytest.raises(DBAPIError) as exc:
        transaction(sessionmaker(engine), work, "a test", retry_for=1.0)
    took = time.monotonic() - started
    engine.dispose()
    assert unreachable(exc.value)
    assert len(calls) >= 3 and 0.5 < took < 1.0 + CONNECT_TIMEOUT, (len(calls), took)  # backoff from 0.1 s


def test_a_transaction_does_not_retry_a_querys_own_failure(session: Session) -> None:
    calls = []

    def work(s: Session) -> None:
        calls.append(1)
        s.execute(text("SELECT * FROM no_such_table"))

    bind = session.get_bind()
    with pytest.raises(DBAPIError):
        transaction(sessionmaker(bind), work, "a test", retry_for=5.0)
    assert calls == [1]


def test_a_transaction_commits_what_it_returns(session: Session) -> None:
    job_id, (chunk,) = make_job(session, items=2)
    makes = sessionmaker(session.get_bind(), expire_on_commit=False)
    claimed = transaction(makes, lambda s: transitions.claim_chunk(s, chunk, "w", "a1"), "a claim")
    assert claimed is not None and claimed.job_id == job_id
    session.expire_all()
    assert session.get(Chunk, chunk).state == ChunkState.RUNNING  # type: ignore[union-attr]


def test_a_claim_repeated_after_a_lost_commit_answer_is_still_this_attempts(session: Session) -> None:
    """The commit went through but its answer was lost: the retry must not take the chunk for someone else's."""
    job_id, (chunk, _) = make_job(session)
    assert transitions.claim_chunk(session, chunk, "worker-a", "attempt-1") is not None
    session.commit()
    again = transitions.claim_chunk(session, chunk, "worker-a", "attempt-1")
    assert again is not None and again.attempt == "attempt-1" and again.job_id == job_id
    # a duplicate delivery (a new attempt token), or another worker, is refused as before
    assert transitions.claim_chunk(session, chunk, "worker-a", "attempt-2") is None
    assert transitions.claim_chunk(session, chunk, "worker-b", "attempt-1") is None


def test_item_claims_and_results_repeated_change_nothing_twice(session: Session) -> None:
    _, (chunk, _) = make_job(session)
    ids = transitions.pending_items(session, chunk)
    first = transitions.claim_items(session, ids, "a1")
    session.commit()
    assert transitions.claim_items(session, ids, "a1") == first  # the same claim, its tries counted once
    assert [i.attempts for i in session.scalars(select(Item).where(Item.id.in_(ids)))] == [1, 1]
    ok = {"state": ItemState.SUCCEEDED, "output": {"response": "ok"}, "completion_tokens": 1}
    assert transitions.write_result(session, ids[0], "a1", ok)
    session.commit()
    assert not transitions.write_result(session, ids[0], "a1", ok)  # the repeat finds it written
    transitions.write_results(session, "a1", {ids[1]: ok})
    session.commit()
    transitions.write_results(session, "a1", {ids[1]: {"state": ItemState.FAILED, "error": "late"}})
    session.commit()
    session.expire_all()
    assert [i.state for i in session.scalars(select(Item).where(Item.id.in_(ids)))] == ["succeeded", "succeeded"]


def test_a_release_repeated_after_a_lost_commit_answer_counts_no_try_twice(session: Session) -> None:
    _, (chunk, _) = make_job(session)
    assert transitions.claim_chunk(session, chunk, "w", "a1") is not None
    ids = transitions.pending_items(session, chunk)
    transitions.claim_items(session, ids[:1], "a1")  # one claimed, one not yet
    session.commit()
    assert transitions.release_chunk(session, chunk, "a1", "unused", "boom")
    session.commit()
    tries = [i.attempts for i in session.scalars(select(Item).where(Item.id.in_(ids)).order_by(Item.seq))]
    assert transitions.release_chunk(session, chunk, "a1", "unused", "boom")  # still queued: send it (again)
    session.commit()
    session.expire_all()
    assert [i.attempts for i in session.scalars(select(Item).where(Item.id.in_(ids)).order_by(Item.seq))] == tries
    assert session.get(Chunk, chunk).state == ChunkState.QUEUED  # type: ignore[union-attr]


def test_postgres_engines_bound_a_connect_and_keep_alive(tmp_path: Path) -> None:
    """The libpq options that bound a connect and find a silent peer reach the driver; SQLite's engine has none."""
    seen: dict[str, dict[str, Any]] = {}
    for name, url in (("postgresql", closed_port_url()), ("sqlite", f"sqlite:///{tmp_path / 'x.db'}")):
        engine = engine_for(url)

        @event.listens_for(engine, "do_connect")
        def capture(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any], name: str = name) -> None:
            seen[name] = dict(cparams)

        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            assert name == "postgresql" and unreachable(exc)
        finally:
            engine.dispose()
    assert seen["postgresql"]["connect_timeout"] == CONNECT_TIMEOUT
    assert seen["postgresql"]["keepalives"] == 1 and seen["postgresql"]["tcp_user_timeout"] > 0
    assert "connect_timeout" not in seen["sqlite"] and "keepalives" not in seen["sqlite"]


POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")


@pytest.mark.skipif(not POSTGRES_URL.startswith("postgresql"), reason="TEST_DATABASE_URL is not PostgreSQL")
def test_a_session_the_server_ends_is_an_outage_and_the_retry_reconnects() -> None:
    """What an immediate stop does to a session in use (``terminating connection due to administrator command``,
    SQLSTATE 57P01), made by ending this session's backend from another: an outage, and the transaction's retry
    runs on a fresh connection."""
    engine = engine_for(POSTGRES_URL)
    makes = sessionmaker(engine)
    killed: list[int] = []

    def work(session: Session) -> int:
        pid = int(session.scalar(text("SELECT pg_backend_pid()")) or 0)
        if not killed:  # the first try loses its backend mid-transaction
            killed.append(pid)
            with engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            session.scalar(text("SELECT 1"))
        return pid

    with makes() as session:  # the bare error first
        pid = int(session.scalar(text("SELECT pg_backend_pid()")) or 0)
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as ended:
            session.scalar(text("SELECT 1"))
    assert unreachable(ended.value), repr(ended.value.orig)
    assert getattr(ended.value.orig, "sqlstate", None) == "57P01"
    assert transaction(makes, work, "a test", retry_for=10.0) != killed[0]
