"""The dispatcher's order (jobs/dispatch.py) on a SQLite database: which held chunks go to the broker first."""

from __future__ import annotations

from datetime import timedelta
from itertools import count

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import dispatch
from jobs.models import Chunk, ChunkState, Job, JobStatus, utcnow

_ids = count()




def held_job(session: Session, chunks: int, *, owner: str | None = None, age: float = 0.0, **job: object) -> str:
    job_id = f"job_{next(_ids)}"
    fields: dict[str, object] = {"status": JobStatus.QUEUED, **job}
    session.add(Job(id=job_id, kind="generate", model="m", model_digest="d", options={}, chunk_size=2,
                    item_count=2 * chunks, meta={}, owner=owner, created_at=utcnow() - timedelta(seconds=age), **fields))
    session.flush()
    for n in range(chunks):
        session.add(Chunk(id=f"{job_id}_c{n}", job_id=job_id, model_digest="d", seq=n, state=ChunkState.QUEUED, held=True))
    session.commit()
    return job_id


def owners_of(released: list[tuple[str, str, str]]) -> list[str]:
    return [job_id for _, _, job_id in released]


def test_owners_take_turns_whatever_came_first(session: Session) -> None:
    a = held_job(session, 10, owner="team-a", age=60)
    b = held_job(session, 10, owner="team-b")
    assert owners_of(dispatch.release(session, "d", 6)) == [a, a, a, b, b, b]  # per job, in chunk order
    session.rollback()
    picks = owners_of(dispatch.release(session, "d", 5))
    assert picks.count(a) == 3 and picks.count(b) == 2  # the older job breaks the tie


def test_an_owner_with_work_in_flight_waits_for_the_others(session: Session) -> None:
    a = held_job(session, 10, owner="team-a", age=60)
    first = dispatch.release(session, "d", 3)
    assert owners_of(first) == [a, a, a]
    b = held_job(session, 10, owner="team-b")
    # a's three chunks wait in the queue: no room until they are taken; then b catches up first
    assert dispatch.release(session, "d", 3) == []
    for chunk_id, _, _ in first:
        session.get(Chunk, chunk_id).state = ChunkState.RUNNING  # type: ignore[union-attr]
    session.commit()
    assert owners_of(dispatch.release(session, "d", 3)) == [b, b, b]


def test_a_near_deadline_goes_first_and_priority_moves_a_deadline(session: Session) -> None:
    relaxed = held_job(session, 4, owner="x", age=600)
    urgent = held_job(session, 2, owner="x", expires_at=utcnow() + timedelta(minutes=30))
    assert owners_of(dispatch.release(session, "d", 3)) == [urgent, urgent, relaxed]
    low = held_job(session, 2, owner="y", age=300, priority=-5)
    high = held_job(session, 2, owner="y", priority=5)
    order = owners_of(dispatch.release(session, "d", 20))
    assert order.index(high) < order.index(low)


def test_the_oldest_job_becomes_urgent_so_none_waits_forever(session: Session) -> None:
    for _ in range(2):
        held_job(session, 3, owner="small")  # fresh jobs of an owner with nothing in flight
    old = held_job(session, 1, owner="big", age=23 * 3600)  # its 24 h are nearly up
    assert owners_of(dispatch.release(session, "d", 1)) == [old]


def test_stopped_jobs_release_nothing(session: Session) -> None:
    gone = held_job(session, 3, status=JobStatus.CANCELLED)
    assert dispatch.release(session, "d", 5) == []
    assert session.scalar(select(Chunk.held).where(Chunk.job_id == gone)) is True
