"""A stop costs per chunk, not per item (issue #38): cancel and expiry run the same statements whatever the job's
size, a stopped job's pending items read as cancelled to every reader (jobs/readstates.py) without being written,
no late claim runs one, and the reconciler's settling writes them later without changing what anyone reads.  On
a SQLite database with no worker, Redis or model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import create_engine, event, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from corral.settings import Settings
from jobs import readstates, transitions
from jobs.db import engine_for
from jobs.models import Base, Chunk, ChunkState, Item, ItemState, Job, JobStatus, utcnow
from jobs.reconcile import Reconciler
from jobs.service import result_line
from jobs.status import item_counts
from jobs.stopping import stop_jobs
from tests.unit.test_stopping import Recorder
from tests.unit.test_transitions import job_status, make_job, states, succeed

_ids = count()


@contextmanager
def statements(session: Session) -> Iterator[list[str]]:
    """The SQL statements the session's engine runs inside the block (an executemany counts once)."""
    seen: list[str] = []
    engine = session.get_bind()

    def record(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def stored(session: Session, job_id: str) -> list[str]:
    """The item states as stored (not as read)."""
    session.expire_all()
    return list(session.scalars(select(Item.state).where(Item.job_id == job_id).order_by(Item.seq)))


def stop_cost(session: Session, items: int, stop: Callable[[str], bool]) -> list[str]:
    job_id, _ = make_job(session, items=items, chunk_size=10)
    with statements(session) as seen:
        assert stop_jobs(session, Recorder(session), [(job_id, "d")], stop) == [(job_id, "d")]  # type: ignore[arg-type]
    assert states(session, job_id) == ["cancelled"] * items
    assert stored(session, job_id) == ["pending"] * items  # not one item row written
    return seen


def test_a_cancel_runs_the_same_statements_for_10_and_1000_items(session: Session) -> None:
    def cancel(job: str) -> bool:
        return transitions.stop_job(session, job, JobStatus.CANCELLED)

    small, large = stop_cost(session, 10, cancel), stop_cost(session, 1000, cancel)
    assert small == large and len(small) <= 6, small
    assert "INSERT" not in small and small.count("UPDATE") == 2  # the job's row, and its chunks' in one statement


def test_a_stopped_jobs_held_chunks_go_and_its_sent_ones_are_done(session: Session) -> None:
    job_id, chunks = make_job(session, items=6, chunk_size=2)
    for chunk_id in chunks[1:]:  # as submission leaves them: held until the dispatcher sends them
        session.get(Chunk, chunk_id).held = True  # type: ignore[union-attr]
    session.commit()
    assert transitions.chunk_ids(session, job_id) == chunks[:1]  # only a sent chunk has a Redis marker to drop
    assert transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    session.commit()
    left = session.execute(select(Chunk.id, Chunk.state).where(Chunk.job_id == job_id)).all()
    assert [tuple(row) for row in left] == [(chunks[0], ChunkState.DONE)]
    assert transitions.held_models(session) == [] and transitions.claim_chunk(session, chunks[1], "w", "late") is None
    assert states(session, job_id) == ["cancelled"] * 6
    transitions.settle_batch(session, job_id)  # items of a deleted chunk settle by their job
    session.commit()
    assert stored(session, job_id) == ["cancelled"] * 6


def test_an_expiry_runs_the_same_statements_for_10_and_1000_items(session: Session) -> None:
    def expire(job: str) -> bool:
        return transitions.stop_job(session, job, JobStatus.EXPIRED)

    assert stop_cost(session, 10, expire) == stop_cost(session, 1000, expire)


def test_no_claim_runs_a_stopped_jobs_pending_item(session: Session) -> None:
    job_id, (first, second) = make_job(session)
    claimed = transitions.claim_chunk(session, first, "w", "a1")  # the worker had its chunk before the cancel
    assert claimed is not None
    ids = transitions.pending_items(session, first)
    assert transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    session.commit()
    assert transitions.claim_items(session, ids, "a1") == []  # the late claim is refused in SQL
    assert transitions.claim_chunk(session, second, "w", "a2") is None  # its other chunk is done
    transitions.close_chunk(session, first, "a1", job_id)  # the worker lets its chunk go
    session.commit()
    assert stored(session, job_id) == ["cancelled", "cancelled", "pending", "pending"]
    assert states(session, job_id) == ["cancelled"] * 4 and job_status(session, job_id) == JobStatus.CANCELLED


def test_a_chunk_released_after_its_job_stopped_cancels_its_items_instead_of_failing_them(session: Session) -> None:
    job_id, [chunk] = make_job(session, items=2, chunk_size=2)
    for n in range(transitions.MAX_ATTEMPTS - 1):  # two tries raised already: the next would fail the items
        transitions.claim_chunk(session, chunk, "w", f"a{n}")
        transitions.claim_items(session, transitions.pending_items(session, chunk), f"a{n}")
        assert transitions.release_chunk(session, chunk, f"a{n}", job_id, "boom")
        session.commit()
    transitions.claim_chunk(session, chunk, "w", "last")
    first, _ = transitions.pending_items(session, chunk)
    transitions.claim_items(session, [first], "last")
    transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    assert not transitions.release_chunk(session, chunk, "last", job_id, "boom")  # not queued again
    session.commit()
    assert stored(session, job_id) == ["cancelled", "cancelled"]
    assert session.get(Chunk, chunk).state == ChunkState.DONE  # type: ignore[union-attr]


def test_every_reader_reads_the_same_before_and_after_settling(session: Session) -> None:
    job_id, [chunk, _] = make_job(session, items=4, chunk_size=2, owner="alice")
    other, _ = make_job(session, items=2, chunk_size=2, owner="alice")  # still queued: its items stay pending
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_chunk(session, chunk, "w", "a1")
    transitions.claim_items(session, [first, second], "a1")
    transitions.write_result(session, first, "a1", succeed())
    transitions.stop_job(session, job_id, JobStatus.CANCELLED)  # `second` is still running
    session.commit()

    def readings() -> dict[str, Any]:
        session.expire_all()
        job = session.get(Job, job_id)
        assert job is not None
        items = list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.seq)))
        finished = session.execute(select(readstates.finished_at()).join(Job, Job.id == Item.job_id)
                                   .where(Item.job_id == job_id).order_by(Item.seq)).scalars().all()
        open_items = session.scalar(select(func.count(Item.id)).join(Job, Job.id == Item.job_id)
                                    .where(Job.owner == "alice", readstates.state_in(ItemState.OPEN)))
        wanted = readstates.stored_states([ItemState.CANCELLED], job.status)
        return {
            "counts": item_counts(session, job_id, job.status)[0],
            "lines": [result_line(i, "m", "generate", job_status=job.status)["state"] for i in items],
            "cancelled": len(list(session.scalars(select(Item.seq).where(Item.job_id == job_id,
                                                                        Item.state.in_(wanted))))),
            "everywhere": readstates.counts_by_state(session),
            "open": open_items,  # the queued-items quota: the running item and the other job's two
            "finished": [f is not None for f in finished],
        }

    before = readings()
    assert before["counts"] == {"pending": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 2}
    assert before["lines"] == ["succeeded", "running", "cancelled", "cancelled"] and before["cancelled"] == 2
    assert before["everywhere"] == {"pending": 2, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 2}
    assert before["open"] == 3 and before["finished"] == [True, False, True, True]
    assert transitions.unsettled_jobs(session) == [job_id]

    assert transitions.settle_batch(session, job_id, limit=1) == 1  # a bounded batch
    assert transitions.settle_batch(session, job_id) == 1
    session.commit()
    assert readings() == before and transitions.unsettled_jobs(session) == []
    assert stored(session, job_id) == ["succeeded", "running", "cancelled", "cancelled"]
    job = session.get(Job, job_id)
    assert job is not None
    ends = session.scalars(select(Item.finished_at).where(Item.job_id == job_id, Item.state == ItemState.CANCELLED))
    assert set(ends) == {job.finished_at}  # they finished when the job stopped
    assert transitions.settle_batch(session, other) == 0  # an active job's items are never touched


def test_retry_of_a_cancelled_job_reruns_its_failed_items_and_leaves_the_rest_cancelled(session: Session) -> None:
    job_id, [chunk, _] = make_job(session, items=4, chunk_size=2)
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_chunk(session, chunk, "w", "a1")
    transitions.claim_items(session, [first, second], "a1")
    transitions.write_result(session, first, "a1", succeed())
    transitions.write_result(session, second, "a1", {"state": ItemState.FAILED, "error": "boom"})
    transitions.close_chunk(session, chunk, "a1", job_id)
    transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    session.commit()
    assert states(session, job_id) == ["succeeded", "failed", "cancelled", "cancelled"]
    job = session.get(Job, job_id)
    assert job is not None and job.finished_at is not None
    new = transitions.requeue_failed(session, job, lambda: f"chunk_r{next(_ids)}")
    session.commit()
    assert len(new) == 1 and job_status(session, job_id) == JobStatus.QUEUED
    # the queued job's never-run items stay cancelled (written now), only the failed one runs again
    assert states(session, job_id) == stored(session, job_id) == ["succeeded", "pending", "cancelled", "cancelled"]
    assert transitions.pending_items(session, new[0]) == [second]
    session.refresh(job)
    assert job.finished_at is None
    transitions.claim_chunk(session, new[0], "w", "a2")
    transitions.claim_items(session, [second], "a2")
    transitions.write_result(session, second, "a2", succeed())
    transitions.close_chunk(session, new[0], "a2", job_id)
    session.commit()
    session.refresh(job)
    assert job.status == JobStatus.COMPLETED and job.finished_at is not None


def test_an_expired_jobs_items_finish_when_it_expired(session: Session) -> None:
    job_id, _ = make_job(session, items=3, expires_at=utcnow() - timedelta(seconds=1))
    assert transitions.expire_overdue(session) == [(job_id, "d")]
    session.commit()
    assert states(session, job_id) == ["cancelled"] * 3
    job = session.get(Job, job_id)
    assert job is not None and job.status == JobStatus.EXPIRED
    assert item_counts(session, job_id, job.status)[0]["cancelled"] == 3


POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
    not POSTGRES_URL.startswith("postgresql"), reason="TEST_DATABASE_URL is not PostgreSQL"))])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL with the job tables: a fresh SQLite file, or a schema of its own in TEST_DATABASE_URL's
    PostgreSQL (the shared test database is left alone)."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'sweep.db'}", None
    else:
        schema = f"cancel_cost_{os.getpid()}_{next(_ids)}"
        maker = create_engine(POSTGRES_URL)
        with maker.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        maker.dispose()
        url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    Base.metadata.create_all(engine_for(url))
    try:
        yield url
    finally:
        engine_for(url).dispose()
        if schema:
            dropper = create_engine(POSTGRES_URL)
            with dropper.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            dropper.dispose()


def new_job(session: Session, items: int = 4, chunk_size: int = 2) -> tuple[str, list[str]]:
    """:func:`make_job` where foreign keys are enforced (PostgreSQL, corral's SQLite engine): the job's row first."""
    job_id = f"job_fk_{next(_ids)}"
    session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, status=JobStatus.QUEUED,
                    chunk_size=chunk_size, item_count=items, meta={}))
    session.flush()
    chunks = [f"chunk_fk_{next(_ids)}" for _ in range(0, items, chunk_size)]
    session.add_all(Chunk(id=chunk_id, job_id=job_id, model_digest="d", seq=n, state=ChunkState.QUEUED)
                    for n, chunk_id in enumerate(chunks))
    session.flush()
    session.add_all(Item(job_id=job_id, chunk_id=chunks[seq // chunk_size], seq=seq, input={"prompt": str(seq)},
                         state=ItemState.PENDING, attempts=0) for seq in range(items))
    session.commit()
    return job_id, chunks


@pytest.fixture()
def any_session(database: str) -> Iterator[Session]:
    with sessionmaker(engine_for(database), expire_on_commit=False)() as s:
        yield s


def test_a_stopped_jobs_chunk_whose_worker_died_is_done_and_its_running_items_cancelled(any_session: Session) -> None:
    """A cancel leaves a running item to its worker; if that worker is killed, the reconciler's pass over the
    running chunks of dead workers closes the chunk: nothing of the job reads running for ever."""
    session = any_session
    job_id, (chunk, _) = new_job(session)
    active, (other_chunk, _) = new_job(session)
    assert transitions.claim_chunk(session, chunk, "killed-worker", "a1") is not None
    assert transitions.claim_chunk(session, other_chunk, "killed-worker", "b1") is not None
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_items(session, [first, second], "a1")
    transitions.write_result(session, first, "a1", succeed())
    assert transitions.stop_job(session, job_id, JobStatus.CANCELLED)  # `second` is still running
    session.commit()
    assert {c.id: c.attempt for c in transitions.running_chunks(session)} == {chunk: "a1", other_chunk: "b1"}
    assert not transitions.requeue_orphan(session, chunk, "a1")  # a stopped job's chunk is never queued again
    assert not transitions.cancel_orphan(session, other_chunk, "b1")  # an active job's is re-queued instead
    assert transitions.cancel_orphan(session, chunk, "a1")
    session.commit()
    assert states(session, job_id) == ["succeeded", "cancelled", "cancelled", "cancelled"]
    assert stored(session, job_id) == ["succeeded", "cancelled", "pending", "pending"]  # the settling's to write
    item = session.get(Item, second)
    assert item is not None and item.claim is None and item.finished_at is not None
    assert item.error is not None and "stopped" in item.error
    assert session.get(Chunk, chunk).state == ChunkState.DONE  # type: ignore[union-attr]
    job = session.get(Job, job_id)
    assert job is not None and item_counts(session, job_id, job.status)[0]["running"] == 0
    assert [c.id for c in transitions.running_chunks(session)] == [other_chunk]
    assert not transitions.cancel_orphan(session, chunk, "a1")  # done once

    # the worker was not dead after all (a stalled heartbeat): what it writes now is refused
    assert not transitions.write_result(session, second, "a1", succeed())
    transitions.write_results(session, "a1", {second: succeed()})
    transitions.close_chunk(session, chunk, "a1", job_id)
    session.commit()
    assert stored(session, job_id) == ["succeeded", "cancelled", "pending", "pending"]
    assert job_status(session, job_id) == JobStatus.CANCELLED
    assert transitions.requeue_orphan(session, other_chunk, "b1") and job_status(session, active) == JobStatus.QUEUED


def settled_jobs(session: Session, n: int) -> None:
    """``n`` cancelled jobs whose items the reconciler has written already (two each)."""
    now = utcnow()
    ids = [f"settled_{next(_ids)}" for _ in range(n)]
    session.execute(insert(Job), [
        {"id": job_id, "kind": "generate", "model": "m", "model_digest": "d", "options": {}, "chunk_size": 2,
         "status": JobStatus.CANCELLED, "item_count": 2, "meta": {}, "finished_at": now - timedelta(seconds=k)}
        for k, job_id in enumerate(ids)
    ])
    session.execute(insert(Item), [
        {"job_id": job_id, "chunk_id": None, "seq": seq, "input": {}, "state": ItemState.CANCELLED, "attempts": 0}
        for job_id in ids for seq in range(2)
    ])
    session.commit()


def test_a_settling_sweep_runs_the_same_statements_over_30_and_3000_settled_jobs(database: str, tmp_path: Path) -> None:
    """The sweep finds the stopped jobs left to settle in one statement, not one per stopped job (20,000 of them
    took 2.7 s a sweep on SQLite, 5.5 s on PostgreSQL, on the heartbeat thread)."""
    settings = Settings(home=tmp_path, database_url=database)
    reconciler = Reconciler(settings, Celery("unit"), redis.Redis(), "unit")  # settling uses neither
    session = reconciler.sessions()
    cost = []
    for settled in (30, 3000):
        settled_jobs(session, settled)
        job_id, _ = new_job(session, items=3)
        assert transitions.stop_job(session, job_id, JobStatus.CANCELLED)
        session.commit()
        with statements(session) as seen:
            assert reconciler.settle(since=utcnow() - timedelta(days=1)) == 3
        assert stored(session, job_id) == ["cancelled"] * 3
        cost.append(seen)
    assert cost[0] == cost[1] and len(cost[0]) <= 4, cost  # the list, then the job's row and its items
    with statements(session) as seen:
        assert reconciler.settle() == 0
    assert len(seen) == 1  # with nothing to settle: the one list
    session.close()
