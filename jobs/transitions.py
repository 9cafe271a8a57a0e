"""Every change of a job's, chunk's or item's state: the batch state machine, in one place.

The submitter (:mod:`jobs.service`), the worker that runs chunks (:mod:`workers.batch`) and the reconciler
(:mod:`jobs.reconcile`) call these functions and never write a state column themselves.  Each transition is one
conditional ``UPDATE`` whose ``WHERE`` names the state it leaves, so two processes racing for the same row (a
duplicated message, a reconciler re-enqueue beside a slow worker, a cancel beside a finishing chunk) cannot both
win, and the loser learns it from the row count.  The rules:

- a chunk is claimed ``queued -> running`` with a fresh attempt token; only one claim of a delivery wins;
- its items are claimed ``pending -> running`` under the same token, and a result is written only while that
  claim holds (state ``running`` and the same token), so no result is written twice or over another's;
- a job is ``completed`` once no item is pending or running; a stopped job (cancelled, expired, failed) is never
  reopened except by :func:`requeue_failed` (retry);
- stopping a job changes its row and its chunks' only, a bounded number of statements whatever its size: its
  pending items stay stored ``pending`` and read as cancelled (:mod:`jobs.readstates`), no claim of one succeeds
  (an item is claimed only under an active job), and the reconciler rewrites them later in bounded batches
  (:func:`settle_batch`); a running item is stopped by the caller's Redis flag between tokens, or, when its
  worker died, written cancelled by the reconciler (:func:`cancel_orphan`).

Functions take an open :class:`~sqlalchemy.orm.Session` and leave the commit to the caller, which commits before
it enqueues anything (SQL first, then the message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Table, and_, bindparam, delete, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Update

from jobs import webhooks
from jobs.models import Chunk, ChunkState, Item, ItemState, Job, JobStatus, utcnow

# How many times an item is claimed before a worker crash or a raising task fails it for good.
MAX_ATTEMPTS = 3
# The columns a finished item's result sets (besides its state's bookkeeping).
RESULT_COLUMNS = ("state", "error", "output", "embedding", "prompt_tokens", "completion_tokens")


@dataclass(frozen=True)
class ClaimedChunk:
    """What a worker needs to run a chunk it has just claimed."""

    chunk_id: str
    attempt: str
    job_id: str
    job_status: str
    kind: str
    model: str
    model_digest: str
    options: dict[str, Any]
    cache: bool = False  # the job adds its deterministic results to the result cache (jobs/dedup.py)


# -- chunks ---------------------------------------------------------------------------------------------------


def claim_chunk(session: Session, chunk_id: str, worker: str, attempt: str) -> ClaimedChunk | None:
    """``queued -> running`` for ``worker`` under ``attempt``; None when the chunk is not queued (a duplicate
    delivery, a chunk already taken, a deleted job).

    Safe to repeat with the same ``attempt`` (a fresh token per delivery): a claim whose commit's outcome was
    unknown (the database went away between the COMMIT and its answer) and that did commit is found again as
    this attempt's, not refused as a chunk someone else took (which would leave it ``running`` for good under
    a worker that lives on and never runs it)."""
    claimed = _changed(
        session,
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.state == ChunkState.QUEUED)
        .values(state=ChunkState.RUNNING, worker=worker, attempt=attempt, started_at=utcnow())
    )
    if not claimed and session.scalar(select(Chunk.attempt).where(Chunk.id == chunk_id, Chunk.state == ChunkState.RUNNING,
                                                                 Chunk.worker == worker)) != attempt:
        return None
    row = session.execute(
        select(Job.id, Job.status, Job.kind, Job.model, Job.model_digest, Job.options, Job.cache)
        .join(Chunk, Chunk.job_id == Job.id)
        .where(Chunk.id == chunk_id)
    ).one_or_none()
    if row is None:
        return None
    job_id, status, kind, model, digest, options, cache = row
    return ClaimedChunk(chunk_id, attempt, job_id, status, kind, model, digest, dict(options or {}), bool(cache))


def start_job(session: Session, job_id: str) -> None:
    """``queued -> running`` when its first chunk starts (a job already running or ended stays as it is)."""
    _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=utcnow())
    )


def close_chunk(session: Session, chunk_id: str, attempt: str, job_id: str) -> bool:
    """``running -> done`` for the attempt that holds the chunk.  Pending items left in it belong to a stopped
    job and are written cancelled (they read so already); the job completes if that was its last open work.
    True when the chunk is closed under ``attempt`` (now, or by this same close repeated after a commit whose
    answer was lost); False when another attempt holds it: a late close changes nothing, and its caller must
    leave the chunk's Redis markers to that attempt."""
    now = utcnow()
    _cancel_if_stopped(session, chunk_id, job_id)
    closed = _changed(
        session,
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.attempt == attempt)
        .values(state=ChunkState.DONE, finished_at=now)
    )
    finish_job_if_done(session, job_id)
    return bool(closed)


def requeue_orphan(session: Session, chunk_id: str, attempt: str | None) -> bool:
    """A chunk whose worker died while running ``attempt``: its unfinished items go back to ``pending``, except
    those that had already been tried :data:`MAX_ATTEMPTS` times (an item that crashes every worker that runs it
    is failed, never claimed again), and the chunk to ``queued`` (the caller enqueues it again).  False when the
    chunk moved on since the caller saw that attempt (it finished, or another worker claimed it anew), or its job
    stopped (:func:`cancel_orphan` closes it instead)."""
    moved = _changed(
        session,
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.state == ChunkState.RUNNING, Chunk.attempt == attempt,
               Chunk.job_id.in_(_active_jobs()))
        .values(state=ChunkState.QUEUED, worker=None, attempt=None, enqueued_at=utcnow())
    )
    if moved:
        running = (Item.chunk_id == chunk_id, Item.state == ItemState.RUNNING)
        _changed(
            session,
            update(Item).where(*running, Item.attempts >= MAX_ATTEMPTS)
            .values(state=ItemState.FAILED, claim=None, finished_at=utcnow(), output={"status_code": 500},
                    error=f"the worker running this item stopped (a crash or a kill) {MAX_ATTEMPTS} times; "
                    "it is not tried again"),
        )
        _changed(session, update(Item).where(*running).values(state=ItemState.PENDING, claim=None))
    return bool(moved)


def release_chunk(session: Session, chunk_id: str, attempt: str, job_id: str, error: str) -> bool:
    """A chunk whose run raised: let it go at once instead of leaving it ``running`` until its worker dies.

    Its unfinished items (claimed by ``attempt``, or not claimed yet, which counts as a try) go back to
    ``pending``, or to ``failed`` with ``error`` once tried :data:`MAX_ATTEMPTS` times.  True when some are pending:
    the chunk is ``queued`` again and the caller enqueues it; else the chunk is done (and the job perhaps too).

    Safe to repeat: once ``attempt`` no longer holds the chunk (an earlier try of this release committed though
    its answer was lost, or the reconciler re-queued it), nothing is changed again (the items' tries are not
    counted twice), and the answer is whether the chunk waits queued (a second message is harmless: one claim
    wins).
    """
    now = utcnow()
    holder = session.execute(select(Chunk.attempt, Chunk.state, Chunk.held).where(Chunk.id == chunk_id)).one_or_none()
    if holder is None or holder.attempt != attempt:
        return holder is not None and holder.state == ChunkState.QUEUED and not holder.held
    # A stopped job's items do not go back (nor fail for its tries): cancelled, so the chunk is done below.
    _cancel_if_stopped(session, chunk_id, job_id, attempt)
    mine = (Item.chunk_id == chunk_id, Item.state == ItemState.RUNNING, Item.claim == attempt)
    unclaimed = (Item.chunk_id == chunk_id, Item.state == ItemState.PENDING)
    _changed(session, update(Item).where(*unclaimed).values(attempts=Item.attempts + 1))
    failed = {"state": ItemState.FAILED, "claim": None, "finished_at": now, "output": {"status_code": 500},
              "error": f"failed {MAX_ATTEMPTS} times: {error}"}
    for where in (mine, unclaimed):
        _changed(session, update(Item).where(*where, Item.attempts >= MAX_ATTEMPTS).values(**failed))
    _changed(session, update(Item).where(*mine).values(state=ItemState.PENDING, claim=None))
    retry = bool(session.scalar(select(func.count()).select_from(Item).where(*unclaimed)))
    _changed(
        session,
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.attempt == attempt)
        .values(**({"state": ChunkState.QUEUED, "worker": None, "attempt": None, "enqueued_at": now} if retry
                   else {"state": ChunkState.DONE, "finished_at": now})),
    )
    if not retry:
        finish_job_if_done(session, job_id)
    return retry


def _cancel_if_stopped(session: Session, chunk_id: str, job_id: str, attempt: str | None = None) -> None:
    """A stopped job's pending items in the chunk (and those ``attempt`` holds) are written cancelled; a chunk's
    worth of rows at most."""
    stopped = select(Job.id).where(Job.id == job_id, Job.status.in_(JobStatus.STOPPED))
    states = Item.state == ItemState.PENDING
    if attempt is not None:
        states = or_(states, and_(Item.state == ItemState.RUNNING, Item.claim == attempt))
    _changed(
        session,
        update(Item)
        .where(Item.chunk_id == chunk_id, states, Item.job_id.in_(stopped))
        .values(state=ItemState.CANCELLED, claim=None, finished_at=utcnow())
    )


def cancel_orphan(session: Session, chunk_id: str, attempt: str | None) -> bool:
    """A chunk of a stopped job whose worker died while running ``attempt``: its running items are written
    cancelled (finished now, with an error that says why), their claim cleared, and the chunk is done.  Its
    pending items already read as cancelled; the settling writes them, with the job's finish time.

    A stop leaves a running item to its worker (the Redis flag stops it between tokens), so a worker killed after
    a cancel left its items ``running`` for good (a Message Batch read ``canceling`` for ever).  A worker that
    comes back finds its claim gone and writes nothing (:func:`write_result`, :func:`close_chunk`).  False when
    the job is active (:func:`requeue_orphan` is for that) or the chunk moved on since the caller saw that
    attempt."""
    now = utcnow()
    moved = _changed(
        session,
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.state == ChunkState.RUNNING, Chunk.attempt == attempt,
               Chunk.job_id.in_(select(Job.id).where(Job.status.in_(JobStatus.STOPPED))))
        .values(state=ChunkState.DONE, attempt=None, finished_at=now)
    )
    if moved:
        _changed(
            session,
            update(Item)
            .where(Item.chunk_id == chunk_id, Item.state == ItemState.RUNNING)
            .values(state=ItemState.CANCELLED, claim=None, finished_at=now,
                    error="the worker running this item stopped (a crash or a kill) after its job was stopped")
        )
    return bool(moved)


def running_chunks(session: Session) -> list[Chunk]:
    """Chunks claimed by some worker, of jobs active or stopped (a completed job's are past caring): the
    reconciler checks their workers are alive, and re-queues an active job's (:func:`requeue_orphan`) or closes a
    stopped job's (:func:`cancel_orphan`) when one is gone."""
    return list(session.scalars(
        select(Chunk).join(Job, Job.id == Chunk.job_id).where(
            Chunk.state == ChunkState.RUNNING, Job.status.in_((*JobStatus.ACTIVE, *JobStatus.STOPPED))
        )
    ))


def queued_chunks(session: Session, enqueued_before: Any) -> list[tuple[str, str, str]]:
    """(chunk id, model digest, job id) of active jobs' chunks released to the broker before ``enqueued_before``
    and still queued (a held chunk has no message to lose)."""
    rows = session.execute(
        select(Chunk.id, Chunk.model_digest, Chunk.job_id).where(
            Chunk.state == ChunkState.QUEUED, Chunk.held.is_(False), Chunk.enqueued_at < enqueued_before,
            Chunk.job_id.in_(_active_jobs()),
        )
    )
    return [(chunk_id, digest, job_id) for chunk_id, digest, job_id in rows]


def held_models(session: Session) -> list[str]:
    """Model digests with held chunks of active jobs (the reconciler's dispatch backstop)."""
    return list(session.scalars(
        select(Chunk.model_digest).where(
            Chunk.state == ChunkState.QUEUED, Chunk.held.is_(True), Chunk.job_id.in_(_active_jobs())
        ).distinct()
    ))


def chunk_ids(session: Session, job_id: str) -> list[str]:
    """The chunks of a job whose Redis markers go when it stops: those released to the broker (a chunk still held
    has no marker: the dispatcher sets it when it sends the chunk, and takes the message back itself if the job
    stopped meanwhile, jobs/queueing.py ``enqueue_chunks``).  All 62,500 of a million-item job were 62,500
    Redis deletes in its cancel."""
    return list(session.scalars(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.held.is_(False))))


# -- items ----------------------------------------------------------------------------------------------------


def pending_items(session: Session, chunk_id: str) -> list[int]:
    """The ids of a chunk's items still to run, in input order."""
    return list(session.scalars(
        select(Item.id).where(Item.chunk_id == chunk_id, Item.state == ItemState.PENDING).order_by(Item.seq)
    ))


def claim_items(session: Session, item_ids: list[int], attempt: str) -> list[tuple[int, dict[str, Any]]]:
    """``pending -> running`` under ``attempt`` (counting the attempt), only while the items' job is active (a
    stopped job's pending items read as cancelled); (id, input) of those this attempt holds, in input order."""
    _changed(
        session,
        update(Item)
        .where(Item.id.in_(item_ids), Item.state == ItemState.PENDING, Item.job_id.in_(_active_jobs()))
        .values(state=ItemState.RUNNING, claim=attempt, attempts=Item.attempts + 1, started_at=utcnow())
    )
    rows = session.execute(
        select(Item.id, Item.input)
        .where(Item.id.in_(item_ids), Item.claim == attempt, Item.state == ItemState.RUNNING)
        .order_by(Item.seq)
    ).all()
    return [(item_id, dict(body)) for item_id, body in rows]


def write_result(session: Session, item_id: int, attempt: str, values: dict[str, Any]) -> bool:
    """Store one item's result (``values``: its final state and result columns) only while ``attempt``'s claim
    holds; False when it does not (the item was re-queued or stopped, and the result is dropped)."""
    return bool(_changed(
        session,
        update(Item)
        .where(Item.id == item_id, Item.claim == attempt, Item.state == ItemState.RUNNING)
        .values(**values, claim=None, finished_at=utcnow())
    ))


def write_results(session: Session, attempt: str, results: dict[int, dict[str, Any]]) -> None:
    """:func:`write_result` for many items in one ``executemany``.

    One UPDATE statement per item cost ~1.4 ms of CPU each on SQLite (175 ms per embed chunk of 128), taken from
    llama.cpp's threads on a small machine while the next chunk decodes.
    """
    if not results:
        return
    table = cast(Table, Item.__table__)
    stmt = (
        update(table)
        .where(table.c.id == bindparam("item_id"), table.c.claim == attempt, table.c.state == ItemState.RUNNING)
        .values(
            claim=None, finished_at=utcnow(),
            **{c: bindparam(f"new_{c}", type_=table.c[c].type) for c in RESULT_COLUMNS},
        )
    )
    rows = [
        {"item_id": item_id, **{f"new_{c}": values.get(c) for c in RESULT_COLUMNS}}
        for item_id, values in results.items()
    ]
    session.execute(stmt, rows)


# -- jobs -----------------------------------------------------------------------------------------------------


def job_stopped(session: Session, job_id: str) -> bool:
    """Whether a job is gone or has stopped early (its remaining items must not run)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or status in JobStatus.STOPPED


def stop_job(session: Session, job_id: str, status: str) -> bool:
    """End an unfinished job early (``cancelled`` or ``expired``): its queued chunks go, so no worker runs them
    and no queue count includes them, and its pending items read as cancelled from this commit on
    (:mod:`jobs.readstates`; they are not written: four statements, whatever the job's size); the caller then
    sets the Redis flag that stops a running item between tokens and takes the chunks' messages out of the
    broker (:func:`jobs.queueing.stopped`).  False if it had already ended.

    A chunk still held (never sent: no message, no marker, no worker) is deleted, and one already sent becomes
    done.  Marking the 62,500 held chunks of a million-item job done took 1.0-1.3 s on PostgreSQL (a new entry in
    each of three indexes per row), deleting them 0.08 s.  The delete goes first: a chunk a dispatcher releases
    meanwhile is not held any more when the delete rechecks it (PostgreSQL), and the update then finds it."""
    now = utcnow()
    stopped = _changed(
        session,
        update(Job).where(Job.id == job_id, Job.status.in_(JobStatus.ACTIVE)).values(status=status, finished_at=now)
    )
    if stopped:
        webhooks.queue_event(session, job_id)
        session.execute(
            delete(Chunk).where(Chunk.job_id == job_id, Chunk.state == ChunkState.QUEUED, Chunk.held.is_(True))
        )
        _changed(
            session,
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == ChunkState.QUEUED)
            .values(state=ChunkState.DONE, finished_at=now),
        )
    return bool(stopped)


def delete_job(session: Session, job_id: str) -> bool:
    """A job's rows (its items, chunks and the job itself) deleted: a delete's change for
    :func:`jobs.stopping.stop_jobs`, which orders the Redis side around it."""
    session.execute(delete(Item).where(Item.job_id == job_id))
    session.execute(delete(Chunk).where(Chunk.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
    return True


def fail_job(session: Session, job_id: str, message: str) -> bool:
    """The whole job cannot run (its model is gone): ``failed`` with ``message``; False if it had ended."""
    return _ended(session, job_id, _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JobStatus.ACTIVE))
        .values(status=JobStatus.FAILED, error=message, finished_at=utcnow())
    ))


def overdue_jobs(session: Session) -> list[tuple[str, str]]:
    """(job id, model digest) of every unfinished job whose window has passed."""
    rows = session.execute(
        select(Job.id, Job.model_digest).where(
            Job.status.in_(JobStatus.ACTIVE), Job.expires_at.is_not(None), Job.expires_at < utcnow()
        )
    ).all()
    return [(job_id, digest) for job_id, digest in rows]


def expire_overdue(session: Session) -> list[tuple[str, str]]:
    """Stop every unfinished job whose window has passed (status ``expired``); (job id, model digest) of each.
    (The reconciler expires them through :func:`jobs.stopping.stop_jobs`, which orders Redis around this.)"""
    return [(job_id, digest) for job_id, digest in overdue_jobs(session) if stop_job(session, job_id, JobStatus.EXPIRED)]


def finish_job_if_done(session: Session, job_id: str) -> bool:
    """Mark a job completed once no item is pending or running (no chord: the database decides)."""
    open_items = session.scalar(
        select(func.count()).select_from(Item).where(Item.job_id == job_id, Item.state.in_(ItemState.OPEN))
    )
    if open_items:
        return False
    return _ended(session, job_id, _changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(JobStatus.ACTIVE))
        .values(status=JobStatus.COMPLETED, finished_at=utcnow())
    ))


def _ended(session: Session, job_id: str, changed: Any) -> bool:
    """A job just ended (``changed``): its webhook delivery is stored in the same transaction."""
    if changed:
        webhooks.queue_event(session, job_id)
    return bool(changed)


def finish_done_jobs(session: Session) -> None:
    """:func:`finish_job_if_done` for every active job (the reconciler's safety net)."""
    for job_id in list(session.scalars(_active_jobs())):
        finish_job_if_done(session, job_id)


def requeue_failed(session: Session, job: Job, new_chunk_id: Callable[[], str]) -> list[str]:
    """Retry: a job's failed items go back to ``pending`` in new chunks and the job to ``queued``; returns the new
    chunk ids (the caller enqueues them after the commit).  Only an ended job can be retried.

    A stopped job's items still stored ``pending`` would read as pending again once the job is queued: they are
    written cancelled first (what the reconciler would have done; per item, but only for a retry of a stopped
    job the reconciler has not settled yet).  The job's row is locked first, so a settling batch
    (:func:`settle_batch`) cannot interleave with this on PostgreSQL."""
    status = session.scalar(select(Job.status).where(Job.id == job.id).with_for_update())
    if status in JobStatus.STOPPED:
        settle_batch(session, job.id)
    failed = list(session.scalars(
        select(Item.id).where(Item.job_id == job.id, Item.state == ItemState.FAILED).order_by(Item.seq)
    ))
    if not failed:
        return []
    base = int(session.scalar(select(func.coalesce(func.max(Chunk.seq), -1)).where(Chunk.job_id == job.id)) or -1) + 1
    chunk_ids = []
    for n, start in enumerate(range(0, len(failed), job.chunk_size)):
        chunk_id = new_chunk_id()
        chunk_ids.append(chunk_id)
        session.add(Chunk(id=chunk_id, job_id=job.id, model_digest=job.model_digest, seq=base + n,
                          state=ChunkState.QUEUED, held=True))
        session.flush()
        _changed(
            session,
            update(Item)
            .where(Item.id.in_(failed[start : start + job.chunk_size]), Item.state == ItemState.FAILED)
            .values(state=ItemState.PENDING, chunk_id=chunk_id, error=None, output=None, claim=None, finished_at=None)
        )
    _changed(
        session,
        update(Job).where(Job.id == job.id).values(status=JobStatus.QUEUED, finished_at=None, error=None)
    )
    return chunk_ids


def unsettled_jobs(session: Session, stopped_since: datetime | None = None, limit: int = 100) -> list[str]:
    """Up to ``limit`` stopped jobs (since ``stopped_since``, or ever) with items still stored ``pending`` (they
    read as cancelled): the reconciler's to settle, most recently stopped first.

    One statement, an index probe per stopped job inside it: one query per job cost 2.7 s on SQLite and 5.5 s on
    PostgreSQL for 20,000 jobs already settled, on the heartbeat thread.  The probe is a scalar subquery with a
    ``LIMIT 1``, not an ``EXISTS``: PostgreSQL turns an ``EXISTS`` into a semi-join and took a whole scan of the
    pending items (0.6 s at a million, those of active jobs too) over it."""
    pending = (
        select(Item.id).where(Item.job_id == Job.id, Item.state == ItemState.PENDING).limit(1).scalar_subquery()
    )
    query = select(Job.id).where(Job.status.in_(JobStatus.STOPPED), pending.is_not(None))
    if stopped_since is not None:
        query = query.where(Job.finished_at >= stopped_since)
    return list(session.scalars(query.order_by(Job.finished_at.desc()).limit(limit)))


def settle_batch(session: Session, job_id: str, limit: int | None = None) -> int:
    """Write up to ``limit`` (None: all) of a stopped job's pending items as the ``cancelled`` they read as, with
    the job's finish time; how many.  Nothing while the job is active (a retry reopened it).  The job's row is
    locked for the transaction (PostgreSQL), as :func:`requeue_failed` locks it, so the two take turns."""
    row = session.execute(
        select(Job.status, Job.finished_at).where(Job.id == job_id).with_for_update()
    ).one_or_none()
    if row is None or row.status not in JobStatus.STOPPED:
        return 0
    pending = (Item.job_id == job_id, Item.state == ItemState.PENDING)
    where: Any = pending
    if limit is not None:  # by id alone outside: with the job named there too, SQLite walked all its pending rows
        where = (Item.state == ItemState.PENDING, Item.id.in_(select(Item.id).where(*pending).limit(limit)))
    return _changed(
        session,
        update(Item).where(*where).values(state=ItemState.CANCELLED, finished_at=row.finished_at or utcnow())
    )


def _active_jobs() -> Any:
    return select(Job.id).where(Job.status.in_(JobStatus.ACTIVE))



def _changed(session: Session, statement: Update) -> int:
    """Run a conditional UPDATE; how many rows it changed (how a racing caller learns whether it won)."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)
