"""Repair batch jobs from SQL after lost messages, killed workers or a flushed Redis.

Runs on every worker's periodic thread (every ``CORRAL_RECONCILE_INTERVAL`` seconds and at start-up); a Redis
lock lets one worker sweep at a time.  It never runs an item itself: it only puts work back in the queue
(through :mod:`jobs.transitions`), and the claims there make a re-enqueue that races the original message harmless.

1. A chunk ``running`` on a worker whose heartbeat has expired: its unfinished items go back to ``pending`` and
   the chunk is re-enqueued (the dead worker's unacked message may come back after the visibility timeout; it
   will find the chunk taken and do nothing), marked as a suspect: the next worker runs it alone, so an item
   that crashes workers fails on its own (after three tries) instead of taking other items with it each time.
   A stopped job's such chunk is done instead, its running items cancelled (no worker is left to stop them).
2. A chunk ``queued`` whose Redis marker is gone (Redis flushed or restarted without persistence; not a chunk
   whose submitter is still sending its job's messages), or names a worker that is gone (it had received the
   message but died before claiming the chunk; its copy of the message waits in the broker's unacked set until
   the visibility timeout), or still says queued while its message is in no queue and with no worker at two
   sweeps in a row (a ``BRPOP`` reply lost on its way to a worker cut off from Redis): re-enqueued.
3. A job with no pending or running item that is not marked ended: completed.
4. A job past its ``expires_at`` (an OpenAI batch's 24h window): expired; its running items stop between
   tokens (the same Redis flag as a cancel), its queued chunk messages leave the broker
   (:mod:`jobs.queueing`), and what finished stays in the output file.
5. A stop noted in Redis whose purge did not finish (the API process died between its commit and its purge):
   its chunk messages are taken out of the broker now.
6. A stopped job's items still stored ``pending`` (a stop does not write them: they read as cancelled,
   :mod:`jobs.readstates`) are written ``cancelled``, :data:`SETTLE_BATCH` per transaction and for at most
   :data:`SETTLE_SECONDS` a sweep, so the table converges without one long statement holding the database.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from corral.broker import messages_present
from corral.protocol import QUEUED_MARKER, WORKER_KEY_PATTERN, chunk_key, model_queue, suspect_key
from corral.settings import Settings
from jobs import dedup, dispatch, queueing, responses, transitions
from jobs.db import sessions
from jobs.models import JobStatus, utcnow
from jobs.queueing import enqueue_chunks
from jobs.stopping import stop_jobs

log = logging.getLogger(__name__)
LOCK_KEY = "corral:reconcile:lock"
# Settling a stopped job's pending items: rows per transaction (~0.15 s on PostgreSQL, whose five indexes on
# job_items each take a new entry per row) and seconds per sweep (a million items settle in a few minutes).
SETTLE_BATCH = 5000
SETTLE_SECONDS = 1.0
# Stopped jobs with pending items listed per statement.
SETTLE_JOBS = 100
# Jobs stopped longer ago than this are looked at only at start-up (their items read right either way).
SETTLE_WITHIN = timedelta(days=1)
# How long re-queueing an orphan waits for a row lock a lost host's open transaction holds (see _orphaned)
ORPHAN_LOCK_WAIT = "1s"
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout that ran out


def _orphaned(session: Session, chunk: Any) -> str:
    """Close (a stopped job's) or re-queue a chunk whose worker is gone, in a savepoint whose statements wait at
    most :data:`ORPHAN_LOCK_WAIT` for a row lock: ``"cancelled"``, ``"requeued"``, ``"moved"`` (it moved on
    meanwhile), or ``"locked"`` (nothing changed).

    A worker host cut off inside a transaction leaves its row locks behind until PostgreSQL ends that session
    (jobs/db.py's keepalives and idle timeout: about 30 s).  Waiting for them held the whole sweep (every other
    orphan, the expiries, the dispatch backstop) for that long, on a thread that also beats; instead this chunk
    waits for the next sweep.  SQLite has one writer and no row locks: nothing to bound."""
    postgres = session.get_bind().dialect.name == "postgresql"
    try:
        with session.begin_nested():
            if postgres:
                session.execute(text(f"SET LOCAL lock_timeout = '{ORPHAN_LOCK_WAIT}'"))
            if transitions.cancel_orphan(session, chunk.id, chunk.attempt):
                outcome = "cancelled"
            elif transitions.requeue_orphan(session, chunk.id, chunk.attempt):
                outcome = "requeued"
            else:
                outcome = "moved"
            if postgres:
                session.execute(text("SET LOCAL lock_timeout TO DEFAULT"))
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        return "locked"  # the savepoint's rollback undid its statements and its SET LOCAL
    return outcome


class Reconciler:
    def __init__(self, settings: Settings, celery: Celery, client: redis.Redis, name: str) -> None:
        self.settings = settings
        self.celery = celery
        self.redis = client
        self.name = name
        self.sessions = sessions(settings)
        # A chunk committed but not yet marked (its submitter is between commit and enqueue) is left alone.
        self.grace = timedelta(seconds=2 * settings.reconcile_interval)
        self._next_prune = 0.0
        # After this long without reaching Redis (an outage, this process stalled), every worker's heartbeat may
        # have lapsed meanwhile: the living get this long again to beat before any of them is taken for dead.
        self.silence = max(settings.heartbeat_ttl, 3 * settings.reconcile_interval)
        self._last_contact: float | None = None
        self._trust_after = 0.0
        self._missing_before: set[str] = set()  # queued chunks whose message the last sweep found nowhere

    def live_workers(self) -> set[str]:
        names = set()
        for key in self.redis.scan_iter(match=WORKER_KEY_PATTERN, count=500):
            names.add(key.decode().split(":", 2)[2])
        return names

    def sweep(self, *, startup: bool = False) -> int:
        """One pass; returns how many chunks were re-enqueued.

        At ``startup`` chunks recorded as running on this very worker name are orphans of its previous life
        (a GPU worker keeps its name across restarts), whatever the heartbeat says.
        """
        ttl = max(2, int(self.settings.reconcile_interval * 2))
        locked = self.redis.set(LOCK_KEY, self.name, nx=True, ex=ttl)
        self._contact()
        if not locked:
            return 0
        try:
            requeued = self._sweep(startup)
            # on the heartbeat thread: a short CORRAL_HEARTBEAT_TTL gets a shorter budget
            self.settle(since=None if startup else utcnow() - SETTLE_WITHIN,
                        budget=min(SETTLE_SECONDS, self.settings.heartbeat_ttl / 4))
            # Webhooks are not sent here but by jobs.webhooks.Sender, in a thread of its own: this sweep runs on the
            # heartbeat thread, which a slow receiver must not hold up.
            if time.monotonic() >= self._next_prune:  # cached results and stored responses past their TTLs go, hourly
                self._next_prune = time.monotonic() + 3600
                with self.sessions() as session:
                    dedup.prune(session, self.settings.result_cache_ttl)
                    responses.purge(session, self.redis)  # stored /v1/responses past CORRAL_RESPONSES_TTL
                    session.commit()
            return requeued
        finally:
            if self.redis.get(LOCK_KEY) == self.name.encode():
                self.redis.delete(LOCK_KEY)

    def _contact(self) -> None:
        """Redis answered: after a silence (see ``silence``), heartbeats are trusted again only a while later."""
        now = time.monotonic()
        if self._last_contact is not None and now - self._last_contact > self.silence:
            self._trust_after = now + self.silence
            log.warning("Redis was out of reach for %.0f s: no worker is taken for dead for %.0f s, while their "
                        "heartbeats resume", now - self._last_contact, self.silence)
        self._last_contact = now

    def _sweep(self, startup: bool) -> int:
        live = self.live_workers()
        if startup:
            live.discard(self.name)
        else:
            live.add(self.name)  # sweeping, so alive, even if a slow database let its heartbeat key lapse
        trusted = time.monotonic() >= self._trust_after  # False just after an outage: see _contact
        requeue: list[tuple[str, str, str]] = []
        now = utcnow()
        with self.sessions() as session:
            expired = stop_jobs(session, self.redis, transitions.overdue_jobs(session),
                                lambda job: transitions.stop_job(session, job, JobStatus.EXPIRED))
            for job_id, _ in expired:
                log.warning("job %s passed its completion window unfinished; expired", job_id)
            self._finish_purges(session)
            for chunk in transitions.running_chunks(session):
                if chunk.worker in live or not trusted:
                    continue
                worker = chunk.worker  # before the re-queue's UPDATE clears it on the session's object too
                outcome = _orphaned(session, chunk)
                if outcome == "cancelled":
                    log.warning("chunk %s of stopped job %s was running on %s, which is gone; its running items are "
                                "cancelled", chunk.id, chunk.job_id, worker)
                elif outcome == "requeued":
                    log.warning("chunk %s was running on %s, which is gone; re-queued it", chunk.id, worker)
                    requeue.append((chunk.id, chunk.model_digest, chunk.job_id))
                    self.redis.set(suspect_key(chunk.id), b"1", ex=24 * 3600)
                elif outcome == "locked":
                    log.warning("chunk %s was running on %s, which is gone, but a transaction still holds its rows "
                                "(the host was cut inside it, and the database keeps its locks until it ends the "
                                "session); the next sweep tries again", chunk.id, worker)
            queued = transitions.queued_chunks(session, now - self.grace)
            busy = queueing.sending(self.redis, {job_id for _, _, job_id in queued})
            queued = [entry for entry in queued if entry[2] not in busy]  # their submitter is still sending
            waiting: list[tuple[str, str, str]] = []
            for start in range(0, len(queued), 1000):
                page = queued[start : start + 1000]
                markers = self.redis.mget([chunk_key(cid) for cid, _, _ in page])
                requeue.extend(entry for entry, marker in zip(page, markers)
                               if not _held_by_the_living(marker, live) and (trusted or marker is None))
                waiting += [entry for entry, marker in zip(page, markers) if marker == QUEUED_MARKER]
            if trusted:
                requeue += self._lost_in_transit(waiting)
            transitions.finish_done_jobs(session)
            held = transitions.held_models(session)
            session.commit()
        if requeue:
            log.warning("re-enqueueing %d chunk(s) lost to dead workers or a flushed Redis", len(requeue))
            self.redis.delete(*[chunk_key(cid) for cid, _, _ in requeue])  # the dead workers' names go
            enqueue_chunks(self.celery, self.redis, requeue)
        for digest in held:  # a backstop: chunks close and jobs stop with a dispatch of their own
            dispatch.send_next(self.sessions, self.celery, self.redis, digest)
        return len(requeue)

    def settle(self, since: datetime | None = None, budget: float = SETTLE_SECONDS, batch: int = SETTLE_BATCH) -> int:
        """Write the pending items of jobs stopped ``since`` (None: ever) as cancelled, a batch per commit, until
        none is left or ``budget`` seconds have passed; how many.  The jobs are found :data:`SETTLE_JOBS` at a
        time, one statement each, however many stopped jobs are settled already."""
        started = time.monotonic()
        settled = 0

        def left() -> bool:
            return time.monotonic() - started < budget

        with self.sessions() as session:
            while left():
                jobs = transitions.unsettled_jobs(session, since, SETTLE_JOBS)
                session.commit()  # the list's read ends its transaction; each batch is one of its own
                for job_id in jobs:
                    while left():
                        n = transitions.settle_batch(session, job_id, batch)
                        session.commit()
                        settled += n
                        if n < batch:
                            break
                    if not left():
                        break
                if len(jobs) < SETTLE_JOBS:
                    break
        return settled

    def _finish_purges(self, session: Session) -> None:
        """Stops noted in Redis whose messages may still be queued (the API process that stopped the job died
        between its commit and its purge): purge them now.  A note whose job is still active never committed."""
        for job_id, (digest, since) in queueing.pending_purges(self.redis).items():
            if transitions.job_stopped(session, job_id):
                queueing.stopped(self.redis, job_id, digest, transitions.chunk_ids(session, job_id))
            elif time.time() - since > self.grace.total_seconds():
                queueing.forget_purge(self.redis, job_id)


    def _lost_in_transit(self, waiting: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Chunks marked queued whose message is nowhere, at this sweep and the one before: no queue list and
        no consumer's unacked set holds it, and no worker wrote its name on the marker.  Redis hands a message
        to a ``BRPOP`` and forgets it; if the reply never reaches the worker (the worker's host cut off while
        it waited, its socket timed out and closed), the message is gone while the marker still says queued.
        Two sweeps apart, so a message between a worker's ``BRPOP`` and its receipt is not taken for lost (a
        copy sent meanwhile would only find the chunk claimed)."""
        ids = {chunk_id for chunk_id, _, _ in waiting}
        missing = ids - messages_present(self.redis, {model_queue(d, "batch") for _, d, _ in waiting}, ids)
        lost = [entry for entry in waiting if entry[0] in missing and entry[0] in self._missing_before]
        self._missing_before = missing - {chunk_id for chunk_id, _, _ in lost}
        for chunk_id, _, job_id in lost:
            log.warning("chunk %s of job %s was marked queued but its message is in no queue and with no worker "
                        "(a reply Redis sent was lost); re-queued it", chunk_id, job_id)
        return lost


def _held_by_the_living(marker: bytes | None, live: set[str]) -> bool:
    """A queued chunk's marker: ``1`` while its message waits in the queue, a worker's name once that worker
    has received it (:func:`workers.batch.mark_received`); no marker: Redis lost the message."""
    if marker is None:
        return False
    return marker == QUEUED_MARKER or marker.decode() in live
