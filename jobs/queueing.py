"""The Redis side of batch jobs: the chunk messages and markers that follow each SQL commit.

SQL decides (:mod:`jobs.transitions`); this module then tells the broker.  A submitted or re-queued chunk gets one
Celery message (its chunk id, and its job's id in a header) and a marker.  A job that stops early (cancelled,
expired, deleted) takes its chunk messages *out* of the broker: they share each model's batch queue with every
other job's, and each one a worker had to fetch only to find its chunk closed would cost a broker round trip,
which for the 62,500 chunks of a cancelled million-line job meant hours of delay for the jobs queued behind it.

A stop is written down in Redis before its SQL commit (:data:`PURGE_PENDING`) and crossed off once the messages
are gone, so the reconciler finishes a purge that a crashed API process left half done.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import redis
from celery import Celery

from corral.broker import JOB_HEADER, purge_job_messages
from corral.protocol import CHUNK_TASK, KEY_PREFIX, QUEUED_MARKER, chunk_key, job_cancel_key, model_queue

log = logging.getLogger(__name__)

# job id -> "<model digest> <unix time>": stops whose messages may still be in the broker.
PURGE_PENDING = f"{KEY_PREFIX}purge"
CANCEL_FLAG_TTL = 24 * 3600
# A submitter refreshes its job's "sending" flag every few hundred messages; one that died lets it lapse, and the
# reconciler then re-sends what it had not.
SENDING_TTL = 60
_PIPELINE = 500


def enqueue_chunks(celery: Celery, client: redis.Redis, chunks: Iterable[tuple[str, str, str]]) -> int:
    """Send one message per (chunk id, model digest, job id), marking each as queued in Redis; how many.

    The mark is set only where none is: a worker that already received the message has written its name there.
    While a job's messages are being sent, :func:`sending` says so (the reconciler leaves its unmarked chunks
    alone).  A job stopped while its messages were being sent gets them purged again here: a stop raises the
    flag before it purges, so whatever this sent after that purge is seen and taken back.  (Submissions no
    longer send a job's chunks at once: the dispatcher, jobs/dispatch.py, sends a few at a time.)
    """
    count = 0
    sent: dict[str, tuple[str, list[str]]] = {}  # job id -> (digest, chunk ids sent)
    pipe = client.pipeline(transaction=False)
    try:
        for chunk_id, digest, job_id in chunks:
            if job_id not in sent:
                sent[job_id] = (digest, [])
                will_send(client, job_id)
            celery.send_task(CHUNK_TASK, args=[chunk_id], queue=model_queue(digest, "batch"),
                             headers={JOB_HEADER: job_id})
            pipe.set(chunk_key(chunk_id), QUEUED_MARKER, nx=True)
            sent[job_id][1].append(chunk_id)
            count += 1
            if count % _PIPELINE == 0:
                for job in sent:
                    pipe.expire(_sending_key(job), SENDING_TTL)
                pipe.execute()
        pipe.execute()
    finally:
        if sent:
            client.delete(*[_sending_key(job) for job in sent])
    flagged = client.mget([job_cancel_key(job) for job in sent]) if sent else []
    for (job_id, (digest, chunk_ids)), flag in zip(sent.items(), flagged):
        if flag is not None:
            stopped(client, job_id, digest, chunk_ids)
    return count


def will_send(client: redis.Redis, job_id: str) -> None:
    """Before the commit of chunks this process is about to send: from the commit on, the reconciler must not
    take their missing markers for lost messages (a big job's rows commit seconds before its last message)."""
    client.set(_sending_key(job_id), b"1", ex=SENDING_TTL)


def sending(client: redis.Redis, job_ids: Iterable[str]) -> set[str]:
    """Which of these jobs have messages being sent right now (their unmarked chunks are not lost yet)."""
    ids = list(job_ids)
    flags = client.mget([_sending_key(job) for job in ids]) if ids else []
    return {job for job, flag in zip(ids, flags) if flag is not None}


def _sending_key(job_id: str) -> str:
    return f"{KEY_PREFIX}sending:{job_id}"


def will_stop(client: redis.Redis, job_id: str, digest: str) -> str:
    """Before a stop's SQL commit: note that the job's messages must leave the broker; the note written (its
    random tail tells this stop's note from another's, for :func:`forget_purge`)."""
    note = f"{digest} {time.time():.0f} {os.urandom(4).hex()}"
    client.hset(PURGE_PENDING, job_id, note)
    return note


def stopped(client: redis.Redis, job_id: str, digest: str, chunk_ids: Iterable[str]) -> int:
    """After a stop's SQL commit: raise the cancel flag (a running item stops between tokens), take the job's
    messages out of its model's batch queue, drop its chunks' markers, and cross the purge off; how many
    messages were removed."""
    client.set(job_cancel_key(job_id), b"1", ex=CANCEL_FLAG_TTL)
    removed = purge_job_messages(client, model_queue(digest, "batch"), job_id)
    pipe = client.pipeline(transaction=False)
    for n, chunk_id in enumerate(chunk_ids, start=1):
        pipe.delete(chunk_key(chunk_id))
        if n % _PIPELINE == 0:
            pipe.execute()
    pipe.hdel(PURGE_PENDING, job_id)
    pipe.execute()
    if removed:
        log.info("job %s stopped: %d chunk message(s) taken out of the queue", job_id, removed)
    return removed


def pending_purges(client: redis.Redis) -> dict[str, tuple[str, float]]:
    """job id -> (model digest, when the stop began) of the stops not yet crossed off."""
    pending: dict[str, tuple[str, float]] = {}
    for job_id, value in client.hgetall(PURGE_PENDING).items():
        digest, started = (value.decode().split(" ") + ["0"])[:2]
        pending[job_id.decode()] = (digest, float(started or 0))
    return pending


_FORGET_SCRIPT = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""


def forget_purge(client: redis.Redis, job_id: str, note: str | None = None) -> None:
    """A noted stop that never committed (its job is still active, or another stop ended it first): nothing to
    purge.  With ``note``, only that note goes: a cancel that noted the same job meanwhile keeps its own."""
    if note is None:
        client.hdel(PURGE_PENDING, job_id)
    else:
        client.eval(_FORGET_SCRIPT, 1, PURGE_PENDING, job_id, note)
