"""Stopping jobs, by cancel, delete or expiry: the one place that orders Redis and SQL for it.

A stop must never leave a job's chunk messages in the broker for workers to find after the job is gone, and must
never purge messages of a job that is still running.  So every stop goes:

1. Redis: the stop is noted (``queueing.will_stop``) before anything commits.  If this process dies between
   the commit and step 3, the reconciler finds the note and finishes the purge (jobs/reconcile.py).
2. SQL: the change (a cancel's or an expiry's transition, a delete's rows) and the commit.  The job's chunk ids
   are read in the same transaction, before a delete takes them.
3. Redis: the cancel flag (a running item stops between tokens), the purge of the job's messages and chunk
   markers, and the note crossed off (``queueing.stopped``); or, for a job the change found already ended, only
   the note crossed off (``queueing.forget_purge``).

The race tests of cancel, delete and expiry (tests/integration/test_cancelled_work.py, tests/unit/test_stopping.py)
hold this order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis
from sqlalchemy.orm import Session

from jobs import queueing, transitions


def stop_jobs(
    session: Session, client: redis.Redis, jobs: Sequence[tuple[str, str]], change: Callable[[str], bool]
) -> list[tuple[str, str]]:
    """Stop ``jobs`` ((job id, model digest) pairs) by ``change``, which makes one job's SQL change in
    ``session`` and says whether it stopped it; commits.  Returns the jobs stopped."""
    notes = {job_id: queueing.will_stop(client, job_id, digest) for job_id, digest in jobs}
    chunks = {job_id: transitions.chunk_ids(session, job_id) for job_id, _ in jobs}
    stopped = [(job_id, digest) for job_id, digest in jobs if change(job_id)]
    session.commit()
    done = set(stopped)
    for job_id, digest in jobs:
        if (job_id, digest) in done:
            queueing.stopped(client, job_id, digest, chunks[job_id])
        else:  # another stop ended it first: only this stop's own note goes
            queueing.forget_purge(client, job_id, notes[job_id])
    return stopped
