"""A job's status as its routes read it: items per state as read under the job's status, token totals, its
place in the queue, and the one statement a status poll costs (:func:`status_query`).

Why a module of its own: the three API families poll their jobs' status through it (:meth:`JobService.get`,
jobs/batches.py, jobs/message_batches.py), on a pool of its own that sends no BEGIN, ROLLBACK or ping
(jobs/db.py ``poll``), so one poll is one round trip to PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Select, bindparam, case, exists, func, or_, select, true
from sqlalchemy.orm import Session, aliased

from jobs import readstates
from jobs.models import Chunk, ChunkState, Item, Job, JobStatus

# A status poll of an open job this large reads its counts from a copy at most this old (jobs' item counts
# take ~0.25 s to compute at a million items on SQLite).
COUNTS_CACHED_FROM = 50_000
Counts = tuple[dict[str, int], tuple[int, int]]  # items per state as read, (prompt, completion) tokens


def item_counts(session: Session, job_id: str, job_status: str) -> Counts:
    """Items per state as read under a job of ``job_status`` (:mod:`jobs.readstates`), and (prompt, completion)
    token totals: the job's progress, computed from its rows."""
    stored, tokens = _stored(session.execute(_per_state(job_id)))
    return readstates.fold_counts(stored, job_status), tokens


def _per_state(job_id: str | BindParameter[str], *conditions: Any) -> Select[str, int, int | None, int | None]:
    """The job's items per stored state, with their token sums: one pass over the covering index."""
    return (select(Item.state, func.count(), func.sum(Item.prompt_tokens), func.sum(Item.completion_tokens))
            .where(Item.job_id == job_id, *conditions).group_by(Item.state))


def _stored(rows: Iterable[Sequence[Any]]) -> tuple[dict[str, int], tuple[int, int]]:
    """:func:`_per_state`'s rows (state, count, prompt tokens, completion tokens; a state of None counts nothing)
    as items per stored state and (prompt, completion) token totals."""
    stored: dict[str, int] = {}
    prompt = completion = 0
    for state, n, prompt_tokens, completion_tokens in rows:
        if state is not None:
            stored[state] = int(n)
            prompt += int(prompt_tokens or 0)
            completion += int(completion_tokens or 0)
    return stored, (prompt, completion)


def counted_exactly(job: Job) -> bool:
    """Whether a status read counts the job's items itself: a job of fewer than :data:`COUNTS_CACHED_FROM` items,
    or one that has ended (a large open job's counts come from Redis, :meth:`JobService._counts`).  The same
    rule in SQL is :func:`_counted_exactly`."""
    return job.item_count < COUNTS_CACHED_FROM or job.status not in JobStatus.ACTIVE


def _counted_exactly(job: Any) -> ColumnElement[bool]:
    return or_(job.item_count < COUNTS_CACHED_FROM, job.status.not_in(JobStatus.ACTIVE))


def chunks_ahead(model_digest: Any, created_at: Any) -> Select[int]:
    """Chunks of older jobs for the same model still waiting or running: how much is ahead of a job of
    ``model_digest`` created at ``created_at`` (values, or the columns of an enclosing query's job)."""
    return (select(func.count()).select_from(Chunk).join(_OLDER, _OLDER.id == Chunk.job_id)
            .where(Chunk.model_digest == model_digest, Chunk.state != ChunkState.DONE, _OLDER.created_at < created_at))


_OLDER = aliased(Job, name="older_jobs")  # made once: an alias adapts every column it is asked for


@dataclass(frozen=True)
class StatusRead:
    """What a status poll's one statement (:func:`status_query`) read of a job: the job's row, its place in the
    queue (while it is queued), and its items per stored state with their token sums, or None for those where
    :func:`counted_exactly` leaves them to a cache."""

    job: Job
    queue_position: int | None
    stored: dict[str, int] | None
    tokens: tuple[int, int]

    def counts(self) -> Counts | None:
        """The counts as read under the job's status (:func:`item_counts`'s form), if the statement counted."""
        if self.stored is None:
            return None
        return readstates.fold_counts(self.stored, self.job.status), self.tokens


def read_status(session: Session, job_id: str) -> StatusRead | None:
    """:func:`status_query`, run; None when there is no such job.  The job routes of the three API families
    poll through it (:meth:`JobService.get`, jobs/batches.py, jobs/message_batches.py)."""
    rows = session.execute(status_query(), {"job_id": job_id}).all()
    if not rows:
        return None
    job, ahead = rows[0][0], rows[0][1]
    stored, tokens = _stored(row[2:] for row in rows)
    return StatusRead(job, None if ahead is None else int(ahead), stored if counted_exactly(job) else None, tokens)


@cache
def status_query() -> Select[Job, int | None, str | None, int | None, int | None, int | None]:
    """A status poll's one statement, of the job its parameter ``job_id`` names (built once: building it costs
    more than running it): the job; its place in the queue while it is queued (:func:`chunks_ahead`,
    else NULL); and its items per stored state with their token sums, one row per state (one row with a NULL
    state when it has none, or when :func:`counted_exactly` leaves its counts to Redis: the count is skipped in
    SQL too, a one-time filter).  One statement is one snapshot: the counts are those of the status beside them,
    which decides how they read (:func:`jobs.readstates.fold_counts`)."""
    job_id: BindParameter[str] = bindparam("job_id")
    this = aliased(Job, name="this_job")
    counted = _per_state(job_id, exists().where(this.id == job_id, _counted_exactly(this))).subquery()
    ahead = case((Job.status == JobStatus.QUEUED, chunks_ahead(Job.model_digest, Job.created_at).scalar_subquery()))
    return select(Job, ahead, *counted.c).outerjoin(counted, true()).where(Job.id == job_id)
