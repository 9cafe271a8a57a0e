"""The one stop operation (jobs/stopping.py): Redis noted before the SQL commit, purged after it, for cancel,
delete and expiry alike, on a SQLite database with a Redis stand-in that records the order of calls."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from jobs import transitions
from jobs.models import Chunk, Item, Job, JobStatus, utcnow
from jobs.stopping import stop_jobs
from tests.unit.test_transitions import job_status, make_job


class Recorder:
    """What a stop asks of Redis, in order, with the commits of the session between them."""

    def __init__(self, session: Session) -> None:
        self.calls: list[str] = []
        commit = session.commit

        def recorded() -> None:
            self.calls.append("commit")
            commit()

        session.commit = recorded  # type: ignore[method-assign]

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return 0 if name == "eval" else self

        return call

    def execute(self) -> list[int]:
        self.calls.append("execute")
        return []


def order(calls: list[str]) -> list[str]:
    """The calls that matter to the order: the note, the commit, the cancel flag and purge, the note's removal."""
    return [c for c in calls if c in ("hset", "commit", "set", "eval", "hdel")]


def test_a_cancel_notes_the_stop_before_its_commit_and_purges_after(session: Session) -> None:
    job_id, _ = make_job(session)
    redis = Recorder(session)
    stopped = stop_jobs(session, redis, [(job_id, "d")],  # type: ignore[arg-type]
                        lambda job: transitions.stop_job(session, job, JobStatus.CANCELLED))
    assert stopped == [(job_id, "d")] and job_status(session, job_id) == "cancelled"
    assert order(redis.calls) == ["hset", "commit", "set", "eval", "hdel"]


def test_a_job_already_ended_only_has_its_note_crossed_off(session: Session) -> None:
    job_id, _ = make_job(session)
    transitions.stop_job(session, job_id, JobStatus.CANCELLED)
    session.commit()
    redis = Recorder(session)
    assert stop_jobs(session, redis, [(job_id, "d")],  # type: ignore[arg-type]
                     lambda job: transitions.stop_job(session, job, JobStatus.CANCELLED)) == []
    assert order(redis.calls) == ["hset", "commit", "eval"]  # its own note only, by compare-and-delete


def test_a_delete_reads_the_chunks_before_it_removes_them(session: Session) -> None:
    job_id, chunks = make_job(session)
    redis = Recorder(session)

    def remove(job: str) -> bool:
        for table in (Item, Chunk, Job):
            session.execute(delete(table).where(table.job_id == job if table is not Job else Job.id == job))
        return True

    assert stop_jobs(session, redis, [(job_id, "d")], remove) == [(job_id, "d")]  # type: ignore[arg-type]
    assert session.get(Job, job_id) is None
    assert order(redis.calls) == ["hset", "commit", "set", "eval", "hdel"]
    assert redis.calls.count("delete") == len(chunks)  # every chunk's marker, read before the rows went


def test_expiry_stops_every_overdue_job_in_one_commit(session: Session) -> None:
    first, _ = make_job(session, expires_at=utcnow() - timedelta(seconds=1))
    second, _ = make_job(session, expires_at=utcnow() - timedelta(seconds=1))
    later, _ = make_job(session, expires_at=utcnow() + timedelta(hours=1))
    redis = Recorder(session)
    expired = stop_jobs(session, redis, transitions.overdue_jobs(session),  # type: ignore[arg-type]
                        lambda job: transitions.stop_job(session, job, JobStatus.EXPIRED))
    assert sorted(expired) == sorted([(first, "d"), (second, "d")])
    assert [job_status(session, j) for j in (first, second, later)] == ["expired", "expired", "queued"]
    assert order(redis.calls) == ["hset", "hset", "commit", "set", "eval", "hdel", "set", "eval", "hdel"]
