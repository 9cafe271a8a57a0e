"""The batch state machine's rules (jobs/transitions.py) on a SQLite database, with no worker, Redis or model:
claims are exclusive, a result is written only while its claim holds, a job finishes when nothing is open,
stopping cancels what has not started, orphans go back to the queue, retry reopens only failed items."""

from __future__ import annotations

from datetime import timedelta
from itertools import count

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import readstates, transitions
from jobs.models import Chunk, ChunkState, Item, ItemState, Job, JobStatus, utcnow

_ids = count()




def make_job(session: Session, items: int = 4, chunk_size: int = 2, **job: object) -> tuple[str, list[str]]:
    """A queued job of ``items`` pending items in chunks of ``chunk_size``, as submission writes it."""
    job_id = f"job_{next(_ids)}"
    session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, status=JobStatus.QUEUED,
                    chunk_size=chunk_size, item_count=items, meta={}, **job))
    chunks = [f"chunk_{next(_ids)}" for _ in range(0, items, chunk_size)]
    for n, chunk_id in enumerate(chunks):
        session.add(Chunk(id=chunk_id, job_id=job_id, model_digest="d", seq=n, state=ChunkState.QUEUED))
    session.flush()
    for seq in range(items):
        session.add(Item(job_id=job_id, chunk_id=chunks[seq // chunk_size], seq=seq, input={"prompt": str(seq)},
                         state=ItemState.PENDING, attempts=0))
    session.commit()
    return job_id, chunks


def states(session: Session, job_id: str) -> list[str]:
    """The job's item states as every reader reads them (jobs/readstates.py)."""
    session.expire_all()
    status = job_status(session, job_id)
    stored = session.scalars(select(Item.state).where(Item.job_id == job_id).order_by(Item.seq))
    return [readstates.reads_as(state, status) for state in stored]


def job_status(session: Session, job_id: str) -> str:
    session.expire_all()
    return session.get(Job, job_id).status  # type: ignore[union-attr]


def succeed() -> dict[str, object]:
    return {"state": ItemState.SUCCEEDED, "output": {"response": "ok"}, "completion_tokens": 1}


def test_a_chunk_is_claimed_once(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    claimed = transitions.claim_chunk(session, chunk, "worker-a", "attempt-1")
    assert claimed is not None and claimed.job_id == job_id and claimed.kind == "generate"
    # a duplicated message, or another worker, finds it taken
    assert transitions.claim_chunk(session, chunk, "worker-b", "attempt-2") is None
    assert session.get(Chunk, chunk).worker == "worker-a"  # type: ignore[union-attr]


def test_items_are_claimed_by_one_attempt_and_counted(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    ids = transitions.pending_items(session, chunk)
    assert len(transitions.claim_items(session, ids, "a1")) == 2
    assert transitions.claim_items(session, ids, "a2") == []  # already running under a1
    assert states(session, job_id) == ["running", "running", "pending", "pending"]
    assert [i.attempts for i in session.scalars(select(Item).where(Item.id.in_(ids)))] == [1, 1]


def test_a_result_is_written_only_while_the_claim_holds(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_items(session, [first, second], "a1")
    assert transitions.write_result(session, first, "a1", succeed())
    assert not transitions.write_result(session, first, "a1", {"state": ItemState.FAILED, "error": "late"})
    assert not transitions.write_result(session, second, "someone-else", succeed())  # not this attempt's claim
    session.commit()
    assert states(session, job_id)[:2] == ["succeeded", "running"]
    item = session.get(Item, first)
    assert item is not None and item.error is None and item.claim is None


def test_many_results_in_one_statement_respect_claims(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_items(session, [first], "a1")
    transitions.write_results(session, "a1", {first: succeed(), second: succeed()})
    session.commit()
    assert states(session, job_id)[:2] == ["succeeded", "pending"]  # the unclaimed item was not written


def test_a_job_completes_when_nothing_is_pending_or_running(session: Session) -> None:
    job_id, chunks = make_job(session)
    for n, chunk in enumerate(chunks):
        claimed = transitions.claim_chunk(session, chunk, "w", f"a{n}")
        assert claimed is not None
        transitions.start_job(session, job_id)
        ids = transitions.pending_items(session, chunk)
        transitions.claim_items(session, ids, f"a{n}")
        assert job_status(session, job_id) == JobStatus.RUNNING
        for item_id in ids:
            transitions.write_result(session, item_id, f"a{n}", succeed())
        transitions.close_chunk(session, chunk, f"a{n}", job_id)
        session.commit()
        assert job_status(session, job_id) == (JobStatus.RUNNING if n == 0 else JobStatus.COMPLETED)
    assert not transitions.finish_job_if_done(session, job_id)  # already completed: nothing changes


def test_stopping_cancels_pending_items_and_a_stopped_job_stays_stopped(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    ids = transitions.pending_items(session, chunk)
    transitions.claim_items(session, ids[:1], "a1")
    assert transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    assert not transitions.stop_job(session, job_id, JobStatus.EXPIRED)  # ended already
    session.commit()
    assert states(session, job_id) == ["running", "cancelled", "cancelled", "cancelled"]
    assert transitions.job_stopped(session, job_id)
    # its chunks are out of the queue counts, and a late message for one finds nothing to claim
    assert {c.state for c in session.scalars(select(Chunk).where(Chunk.job_id == job_id))} == {ChunkState.DONE}
    assert transitions.claim_chunk(session, chunk, "w", "late") is None
    # the running item's result may still land; the job does not reopen or complete
    transitions.write_result(session, ids[0], "a1", succeed())
    transitions.finish_job_if_done(session, job_id)
    session.commit()
    assert job_status(session, job_id) == JobStatus.CANCELLED


def test_only_overdue_unfinished_jobs_expire(session: Session) -> None:
    overdue, _ = make_job(session, expires_at=utcnow() - timedelta(seconds=1))
    later, _ = make_job(session, expires_at=utcnow() + timedelta(hours=1))
    no_window, _ = make_job(session)
    assert transitions.expire_overdue(session) == [(overdue, "d")]
    session.commit()
    assert [job_status(session, j) for j in (overdue, later, no_window)] == ["expired", "queued", "queued"]
    assert states(session, overdue) == ["cancelled"] * 4


def test_an_orphaned_chunk_goes_back_to_the_queue_with_its_unfinished_items(session: Session) -> None:
    job_id, (chunk, _) = make_job(session)
    transitions.claim_chunk(session, chunk, "dead-worker", "a1")
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_items(session, [first, second], "a1")
    transitions.write_result(session, first, "a1", succeed())
    session.commit()
    [running] = transitions.running_chunks(session)
    seen = (running.id, running.attempt)
    assert transitions.requeue_orphan(session, *seen)
    session.commit()
    assert states(session, job_id)[:2] == ["succeeded", "pending"]  # the finished result stays
    assert not transitions.write_result(session, second, "a1", succeed())  # the dead attempt's claim is gone
    assert transitions.claim_chunk(session, chunk, "new-worker", "a2") is not None
    # a second re-queue of the same (now re-claimed) attempt does nothing
    assert not transitions.requeue_orphan(session, *seen)


def test_a_late_close_changes_nothing_and_says_so(session: Session) -> None:
    """A worker taken for dead closes its chunk after another attempt took it over: nothing changes, and it is
    told (so it leaves the chunk's Redis markers, the new attempt's, alone).  Its own close, repeated after a
    commit whose answer was lost, still reads as closed."""
    job_id, [chunk] = make_job(session, items=2, chunk_size=2)
    assert transitions.claim_chunk(session, chunk, "lost-worker", "a1") is not None
    seen = (chunk, "a1")
    assert transitions.requeue_orphan(session, *seen)
    assert transitions.claim_chunk(session, chunk, "new-worker", "a2") is not None
    session.commit()
    assert transitions.close_chunk(session, chunk, "a1", job_id) is False
    row = session.get(Chunk, chunk)
    assert row is not None and (row.state, row.attempt) == (ChunkState.RUNNING, "a2")
    assert transitions.close_chunk(session, chunk, "a2", job_id) is True
    assert transitions.close_chunk(session, chunk, "a2", job_id) is True  # the same close again
    session.commit()


def test_retry_reopens_only_failed_items_in_new_chunks(session: Session) -> None:
    job_id, [chunk] = make_job(session, items=2, chunk_size=2)
    first, second = transitions.pending_items(session, chunk)
    transitions.claim_chunk(session, chunk, "w", "a1")
    transitions.claim_items(session, [first, second], "a1")
    transitions.write_result(session, first, "a1", succeed())
    transitions.write_result(session, second, "a1", {"state": ItemState.FAILED, "error": "boom"})
    transitions.close_chunk(session, chunk, "a1", job_id)
    session.commit()
    assert job_status(session, job_id) == JobStatus.COMPLETED
    job = session.get(Job, job_id)
    assert job is not None
    new = transitions.requeue_failed(session, job, lambda: f"chunk_{next(_ids)}")
    session.commit()
    assert len(new) == 1 and job_status(session, job_id) == JobStatus.QUEUED
    assert states(session, job_id) == ["succeeded", "pending"]
    assert transitions.pending_items(session, new[0]) == [second]
    assert transitions.requeue_failed(session, job, lambda: "unused") == []  # nothing failed any more


def test_a_chunk_whose_task_raised_is_released_at_once_and_fails_after_its_last_try(session: Session) -> None:
    job_id, [chunk] = make_job(session, items=2, chunk_size=2)
    for n in range(1, transitions.MAX_ATTEMPTS + 1):
        assert transitions.claim_chunk(session, chunk, "w", f"a{n}") is not None
        transitions.claim_items(session, transitions.pending_items(session, chunk), f"a{n}")
        retry = transitions.release_chunk(session, chunk, f"a{n}", job_id, "ValidationError: boom")
        session.commit()
        if n < transitions.MAX_ATTEMPTS:
            assert retry and states(session, job_id) == ["pending", "pending"]  # back in the queue at once
            assert session.get(Chunk, chunk).state == ChunkState.QUEUED  # type: ignore[union-attr]
    assert not retry and states(session, job_id) == ["failed", "failed"]
    item = session.scalars(select(Item).where(Item.job_id == job_id)).first()
    assert item is not None and item.error == "failed 3 times: ValidationError: boom"
    assert job_status(session, job_id) == JobStatus.COMPLETED  # item failures do not fail the job


def test_a_task_that_raised_before_claiming_counts_a_try_too(session: Session) -> None:
    job_id, [chunk] = make_job(session, items=1, chunk_size=1)
    for n in range(transitions.MAX_ATTEMPTS):
        transitions.claim_chunk(session, chunk, "w", f"a{n}")
        transitions.release_chunk(session, chunk, f"a{n}", job_id, "OperationalError: database is locked")
        session.commit()
    assert states(session, job_id) == ["failed"]


def test_an_item_that_kills_its_worker_every_time_is_failed_not_claimed_again(session: Session) -> None:
    job_id, [chunk] = make_job(session, items=1, chunk_size=1)
    for n in range(transitions.MAX_ATTEMPTS):
        transitions.claim_chunk(session, chunk, "doomed", f"a{n}")
        transitions.claim_items(session, transitions.pending_items(session, chunk), f"a{n}")
        session.commit()
        assert transitions.requeue_orphan(session, chunk, f"a{n}")  # the worker died (SIGSEGV)
        session.commit()
    assert states(session, job_id) == ["failed"]
    assert "stopped (a crash or a kill) 3 times" in (session.scalars(select(Item.error)).first() or "")
    assert transitions.pending_items(session, chunk) == []
