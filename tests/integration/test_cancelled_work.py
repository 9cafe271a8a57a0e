"""Work that was cancelled, deleted or expired costs the jobs behind it nothing (jobs/queueing.py, jobs/dispatch.py).

A job of 5,000 one-item chunks keeps them in SQL, held, with only a few released to its model's batch queue at a
time (the dispatcher), so a job submitted after it gets its turn; once it stops, its released messages leave the
broker and its held chunks are never sent: a small job submitted next completes in about the time it takes on an
idle server, also after the API and the worker restart, while another job's chunks still run, each item exactly
once.  Each stack here is the test's own (its Redis database, its SQLite file), so its processes can be
restarted and its queues counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from corral.broker import queue_lists
from corral.modelstore.store import ModelStore
from corral.protocol import model_queue
from corral.settings import Settings
from harness.stack import Stack, wait_for
from jobs import dispatch, queueing, transitions
from jobs.db import sessions
from jobs.models import Item, Job, JobStatus, utcnow
from tests.helpers import MODEL, own_stack, submit, wait_done

pytestmark = pytest.mark.slow
BIG = 5_000  # un-purged, one-token chunks this many would keep the small job waiting for minutes


@pytest.fixture(scope="module")
def stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(settings, tmp_path_factory.mktemp("cancelled"), 5, reconcile_interval=1.0) as own:
        yield own


@pytest.fixture(scope="module")
def idle_seconds(stack: Stack) -> float:
    """How long the small job takes on this stack with nothing else queued (the first run loads the model)."""
    small_job(stack)
    return small_job(stack)


def small_job(stack: Stack) -> float:
    """Seconds from submitting a 4-item job until it completed; it must not wait behind stopped work."""
    started = time.monotonic()
    job = submit(stack.base_url, kind="generate", chunk_size=1, options={"num_predict": 4, "temperature": 0},
                 items=[{"prompt": f"Say the number {i}."} for i in range(4)])
    assert job["queue_position"] is None or job["queue_position"] <= 2, job  # at most the chunks still running
    done = wait_done(stack.base_url, job["id"], timeout=3600)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 4, done
    return time.monotonic() - started


def big_job(stack: Stack, items: int = BIG) -> dict[str, Any]:
    """A generate job of ``items`` one-item chunks (one token each, should any run), uploaded as JSONL."""
    body = b'{"prompt": "x"}\n' * items
    params = {"kind": "generate", "model": MODEL, "chunk_size": 1, "options": json.dumps({"num_predict": 1})}
    r = httpx.post(stack.base_url + "/api/jobs", params=params, content=body,
                   headers={"Content-Type": "application/x-ndjson"}, timeout=600)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert job["counts"]["total"] == items
    return job


def queued_messages(stack: Stack) -> int:
    """Chunk messages waiting in the model's batch queue (kombu keeps one Redis list per priority step)."""
    digest = ModelStore(stack.settings.models_path).get(MODEL).model_digest
    return sum(int(stack.redis.llen(name)) for name in queue_lists(model_queue(digest, "batch")))


def assert_quick(stack: Stack, idle: float) -> None:
    """The small job's time stays near the idle one (the 5,000 stale messages would take minutes)."""
    seconds = small_job(stack)
    assert seconds <= 3 * idle + 20, f"the small job took {seconds:.1f}s, {idle:.1f}s on an idle server"


def test_a_cancelled_job_leaves_the_queue_also_across_a_restart(stack: Stack, idle_seconds: float) -> None:
    job = big_job(stack)
    assert queued_messages(stack) <= dispatch.PER_WORKER  # the rest are held in SQL until their turn
    cancelled = httpx.post(f"{stack.base_url}/api/jobs/{job['id']}/cancel", timeout=120).json()
    assert cancelled["status"] == "cancelled" and cancelled["queue_position"] is None
    assert queued_messages(stack) == 0
    overview = httpx.get(stack.base_url + "/api/queue").json()
    assert all(m["batch_chunks_queued"] == 0 for m in overview["models"]), overview
    assert_quick(stack, idle_seconds)

    stack.stop()  # the API and the worker restart on the same Redis and database
    stack.start_both()
    assert queued_messages(stack) == 0
    assert_quick(stack, idle_seconds)


def test_a_deleted_job_leaves_the_queue_and_a_job_behind_it_runs_once(stack: Stack, idle_seconds: float) -> None:
    big = big_job(stack)
    behind = submit(stack.base_url, kind="generate", chunk_size=1, options={"num_predict": 3, "temperature": 0},
                    items=[{"custom_id": f"b{i}", "prompt": f"Name a colour ({i})."} for i in range(6)])
    deleted = httpx.delete(f"{stack.base_url}/api/jobs/{big['id']}", timeout=120).json()
    assert deleted["deleted"] is True
    assert queued_messages(stack) <= 6  # only the job behind it is left
    done = wait_done(stack.base_url, behind["id"], timeout=3600)
    assert done["counts"]["succeeded"] == 6
    with sessions(stack.settings)() as session:
        attempts = list(session.scalars(select(Item.attempts).where(Item.job_id == behind["id"])))
    assert attempts == [1] * 6  # each of its items ran exactly once
    assert queued_messages(stack) == 0
    assert_quick(stack, idle_seconds)


def test_an_expired_job_leaves_the_queue(stack: Stack, idle_seconds: float) -> None:
    job = big_job(stack)
    with sessions(stack.settings)() as session:  # its completion window ends, as 24 hours passing would do
        session.execute(update(Job).where(Job.id == job["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()

    def expired() -> bool:  # (the queue alone empties too when the worker has taken the few chunks released)
        return httpx.get(f"{stack.base_url}/api/jobs/{job['id']}").json()["status"] == "expired"

    wait_for(expired, 120, "the reconciler to expire the job")
    wait_for(lambda: queued_messages(stack) == 0, 30, "the expired job's messages to leave the queue")
    assert_quick(stack, idle_seconds)


def test_a_purge_an_api_process_did_not_finish_is_finished_by_the_reconciler(stack: Stack) -> None:
    """The API noted the stop in Redis and committed it, then died before purging: a worker's reconciler purges
    the job's released messages and crosses the stop off, and none of its held chunks is ever sent."""
    job = big_job(stack, items=2_000)
    with sessions(stack.settings)() as session:
        digest = session.get(Job, job["id"]).model_digest  # type: ignore[union-attr]
        queueing.will_stop(stack.redis, job["id"], digest)
        assert transitions.stop_job(session, job["id"], JobStatus.CANCELLED)
        session.commit()
    assert queueing.pending_purges(stack.redis)
    wait_for(lambda: queued_messages(stack) == 0 and not queueing.pending_purges(stack.redis), 120,
             "the reconciler to finish the purge and cross it off")
