"""Which batch chunk goes to the broker next: deadlines first when they are near, then a fair share per owner.

A job's chunks are written ``held``: queued in SQL, with no Celery message yet.  The dispatcher keeps each
model's batch queue only a few chunks deep (:func:`depth`) and, whenever there is room (after a submission, a
retry, each closed chunk, and every reconciler sweep as a backstop), releases held chunks one at a time in
this order:

1. urgent jobs, earliest deadline first: a job whose deadline is less than :data:`URGENT` away.  The deadline is
   the end of the job's ``completion_window`` (the OpenAI batch's 24 h; a native job's own), or 24 h after it
   was submitted; each ``priority`` point moves it an hour earlier;
2. then the owner (API key) with the least work released and unfinished on the model, so concurrent jobs of
   different owners progress at equal item rates instead of first come, first served;
3. then, within an owner, the earlier (priority-adjusted) deadline, then the older job.

Every deadline is finite and comes nearer, so every job becomes urgent in time: none waits forever (the aging).
Interactive requests are untouched (their own queues, polled first), and cancelled work never reaches the broker.
Releasing is a conditional ``UPDATE`` like every transition, so two dispatchers racing release each chunk once;
the caller commits, then sends (SQL first, then the message).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from corral.protocol import KEY_PREFIX, WORKER_KEY_PATTERN
from jobs.models import Chunk, ChunkState, Job, JobStatus, as_utc, utcnow
from jobs.queueing import enqueue_chunks

URGENT = timedelta(hours=2)
DEFAULT_WINDOW = timedelta(hours=24)
# Released chunks waiting in a model's queue per live worker, beside the two each runs at once: enough that a
# worker finds its next chunk queued when one closes (the close releases a replacement), and few enough that a
# job submitted behind another gets its turn after at most this many of the other's chunks.  It was 4: a second
# owner's first chunks then started only after the first owner's eighth item pair, at the edge of a fair share.
PER_WORKER = 2
LOCK_SECONDS = 10
WORKERS_TTL = 5.0


_workers_seen: tuple[float, int] = (0.0, 0)  # (when, how many live workers): a SCAN per closed chunk is too many


def depth(client: redis.Redis) -> int:
    """How many released chunks a model's batch queue should hold: enough that no live worker ever waits.  The
    live workers are counted at most every :data:`WORKERS_TTL` seconds per process."""
    global _workers_seen
    now = time.monotonic()
    if now - _workers_seen[0] > WORKERS_TTL:
        _workers_seen = (now, sum(1 for _ in client.scan_iter(match=WORKER_KEY_PATTERN, count=500)))
    return PER_WORKER * max(1, _workers_seen[1])


def deadline(job: Job) -> datetime:
    """When the job should be done, moved an hour earlier per priority point (for ordering only)."""
    end = as_utc(job.expires_at) if job.expires_at else as_utc(job.created_at) + DEFAULT_WINDOW
    return end - timedelta(hours=job.priority or 0)


def release(session: Session, model_digest: str, room: int) -> list[tuple[str, str, str]]:
    """Release up to ``room`` more held chunks of ``model_digest`` minus those already waiting in its queue, in the
    module's order; (chunk id, model digest, job id) of each, for the caller to send after its commit."""
    waiting = int(session.scalar(
        select(func.count()).select_from(Chunk)
        .where(Chunk.model_digest == model_digest, Chunk.state == ChunkState.QUEUED, Chunk.held.is_(False))
    ) or 0)
    room -= waiting
    if room <= 0:
        return []
    held = dict(session.execute(
        select(Chunk.job_id, func.count()).where(
            Chunk.model_digest == model_digest, Chunk.state == ChunkState.QUEUED, Chunk.held.is_(True)
        ).group_by(Chunk.job_id)
    ).all())
    if not held:
        return []
    jobs = list(session.scalars(select(Job).where(Job.id.in_(list(held)), Job.status.in_(JobStatus.ACTIVE))))
    if not jobs:
        return []
    load: dict[Any, int] = dict(session.execute(  # items released and unfinished, per owner, on this model
        select(Job.owner, func.sum(Job.chunk_size)).join(Chunk, Chunk.job_id == Job.id).where(
            Chunk.model_digest == model_digest, Chunk.state != ChunkState.DONE, Chunk.held.is_(False),
            Job.status.in_(JobStatus.ACTIVE),
        ).group_by(Job.owner)
    ).all())
    now = utcnow()

    def order(job: Job) -> tuple[Any, ...]:  # the module's order, with ``load`` as it stands
        due = deadline(job)
        urgent = due - now < URGENT
        return (not urgent, due if urgent else now, int(load.get(job.owner) or 0), due, as_utc(job.created_at), job.id)

    picks: dict[str, int] = {}
    for _ in range(room):
        open_jobs = [j for j in jobs if held[j.id] > picks.get(j.id, 0)]
        if not open_jobs:
            break
        best = min(open_jobs, key=order)
        picks[best.id] = picks.get(best.id, 0) + 1
        load[best.owner] = int(load.get(best.owner) or 0) + best.chunk_size
    released: list[tuple[str, str, str]] = []
    for job_id, count in picks.items():
        ids = list(session.scalars(
            select(Chunk.id).where(Chunk.job_id == job_id, Chunk.state == ChunkState.QUEUED, Chunk.held.is_(True))
            .order_by(Chunk.seq).limit(count)
        ))
        flipped = session.scalars(  # only the ones still held: a racing dispatcher released the others
            update(Chunk).where(Chunk.id.in_(ids), Chunk.held.is_(True)).values(held=False, enqueued_at=now)
            .returning(Chunk.id)
        ).all()
        released += [(chunk_id, model_digest, job_id) for chunk_id in flipped]
    return released


def send_next(sessions: Callable[[], Session], celery: Celery, client: redis.Redis, model_digest: str) -> int:
    """Fill ``model_digest``'s batch queue: release chunks in the module's order, commit, send; how many."""
    if not lock(client, model_digest):
        return 0
    try:
        with sessions() as session:
            chunks = release(session, model_digest, depth(client))
            session.commit()
        return enqueue_chunks(celery, client, chunks) if chunks else 0
    finally:
        unlock(client, model_digest)


def lock(client: redis.Redis, model_digest: str) -> bool:
    """One dispatcher per model at a time (the others skip: the holder fills the queue)."""
    return bool(client.set(f"{KEY_PREFIX}dispatch:{model_digest[:16]}", b"1", nx=True, ex=LOCK_SECONDS))


def unlock(client: redis.Redis, model_digest: str) -> None:
    client.delete(f"{KEY_PREFIX}dispatch:{model_digest[:16]}")
