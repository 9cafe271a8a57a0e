"""Nothing lost, nothing duplicated: real processes killed, Redis flushed, the API restarted mid-job."""

from __future__ import annotations

import ast
import json
import re
import signal

import httpx
import pytest
from sqlalchemy import select

from corral.protocol import chunk_key, model_queue
from corral.redis_connection import redis_client
from harness.stack import Stack, wait_for
from jobs.db import sessions
from jobs.models import Item, Job
from tests.helpers import MODEL, wait_done
from workers.runtime import CHUNKS_PER_WORKER

pytestmark = pytest.mark.slow
ITEMS = 14


def start_job(stack: Stack) -> str:
    body = {
        "kind": "generate", "model": MODEL, "chunk_size": 2, "options": {"num_predict": 25, "temperature": 0},
        "items": [{"custom_id": f"item-{i}", "prompt": f"Describe the number {i}."} for i in range(ITEMS)],
    }
    r = httpx.post(stack.base_url + "/api/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for(lambda: counts(stack, job_id)["succeeded"] >= 2, 60, "the job to make progress")
    return job_id


def counts(stack: Stack, job_id: str) -> dict:
    return httpx.get(f"{stack.base_url}/api/jobs/{job_id}", timeout=30).json()["counts"]


def assert_exactly_once(stack: Stack, job_id: str) -> None:
    wait_for(
        lambda: httpx.get(f"{stack.base_url}/api/jobs/{job_id}", timeout=30).json()["status"] == "completed",
        120, "the job to complete", interval=0.1,
    )
    assert counts(stack, job_id) == {
        "total": ITEMS, "pending": 0, "running": 0, "succeeded": ITEMS, "failed": 0, "cancelled": 0,
    }
    lines = [json.loads(x) for x in httpx.get(f"{stack.base_url}/api/jobs/{job_id}/results", timeout=30).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"item-{i}" for i in range(ITEMS)]
    assert all(line["state"] == "succeeded" and line["response"]["eval_count"] > 0 for line in lines)
    with sessions(stack.settings)() as session:
        rows = list(session.scalars(select(Item).where(Item.job_id == job_id)))
    assert len(rows) == ITEMS and all(r.claim is None and r.finished_at is not None for r in rows)


def worker_row(stack: Stack, name: str) -> str | None:
    """The state the console's workers table gives ``name`` (alive or dead), or None when it is not listed."""
    page = httpx.get(f"{stack.base_url}/ui/queue", params={"fragment": 1}, timeout=30).text
    found = re.search(rf'<tr data-worker="{re.escape(name)}">.*?<span class="badge \w+">(\w+)</span>', page, re.S)
    return found.group(1) if found else None


def test_worker_killed_mid_job_then_a_new_worker_finishes_it(isolated: Stack) -> None:
    first, _ = isolated.start_both()
    job_id = start_job(isolated)
    [name] = isolated.worker_names()
    first.stop(signal.SIGKILL)
    assert counts(isolated, job_id)["succeeded"] < ITEMS, "the kill must land mid-job"
    # The operator console shows the killed worker as dead once its heartbeat has lapsed.
    wait_for(lambda: name not in isolated.worker_names(), 10, "the killed worker's heartbeat to lapse")
    assert worker_row(isolated, name) == "dead"
    with sessions(isolated.settings)() as session:
        in_flight = set(session.scalars(select(Item.custom_id).where(Item.job_id == job_id, Item.state == "running")))
    # A worker decodes every item of its running chunks at once (continuous batching), up to CHUNKS_PER_WORKER.
    assert len(in_flight) <= CHUNKS_PER_WORKER * 2
    isolated.start_worker()
    assert_exactly_once(isolated, job_id)
    with sessions(isolated.settings)() as session:
        rows = session.execute(select(Item.custom_id, Item.attempts).where(Item.job_id == job_id)).all()
    attempts = {custom_id: n for custom_id, n in rows}
    # Only the items in flight at the kill ran again, and only once more; everything finished stayed finished.
    assert max(attempts.values()) <= 2
    assert {custom_id for custom_id, n in attempts.items() if n == 2} <= in_flight


def job_with_a_message_taken(isolated: Stack) -> tuple[str, str]:
    """A job submitted with no worker running, one of its chunk messages taken off the queue: (job, chunk)."""
    isolated.start_api()
    body = {"kind": "generate", "model": MODEL, "chunk_size": 2, "options": {"num_predict": 4, "temperature": 0},
            "items": [{"custom_id": f"item-{i}", "prompt": f"Describe the number {i}."} for i in range(ITEMS)]}
    job_id = httpx.post(isolated.base_url + "/api/jobs", json=body, timeout=60).json()["id"]
    with sessions(isolated.settings)() as session:
        digest = session.scalars(select(Job.model_digest).where(Job.id == job_id)).one()
    raw = isolated.redis.rpop(model_queue(digest, "batch"))
    assert raw is not None
    return str(job_id), str(ast.literal_eval(json.loads(raw)["headers"]["argsrepr"])[0])


def test_a_chunk_message_taken_by_a_worker_that_died_before_claiming_it_is_requeued(isolated: Stack) -> None:
    """The narrow window a kill can hit: a worker has taken a chunk's message (it sits in the broker's unacked
    set until the visibility timeout, hours) but has not claimed the chunk in SQL yet.  Made exact here: with
    no worker running, one chunk message is taken off the queue and its marker given a worker that is gone,
    as that worker's receipt would have left it."""
    job_id, chunk_id = job_with_a_message_taken(isolated)
    isolated.redis.set(chunk_key(chunk_id), b"cpu-999@gone")
    isolated.start_worker()
    job = wait_done(isolated.base_url, job_id, timeout=120)
    assert job["counts"]["succeeded"] == ITEMS, job


def test_a_chunk_message_redis_handed_out_but_no_worker_received_is_requeued(isolated: Stack) -> None:
    """Redis forgets a message once a ``BRPOP`` has it; if the reply never reaches the worker (its host cut off
    while it waited, its socket timed out), the chunk's marker still says queued and nothing would ever send it
    again: the job would never end.  Made exact here: with no worker running, one chunk message is taken off
    the queue and dropped, its marker left as it was."""
    job_id, chunk_id = job_with_a_message_taken(isolated)
    assert isolated.redis.get(chunk_key(chunk_id)) == b"1"  # still marked queued
    isolated.start_worker()
    job = wait_done(isolated.base_url, job_id, timeout=120)
    assert job["counts"]["succeeded"] == ITEMS, job
    with sessions(isolated.settings)() as session:
        attempts = list(session.scalars(select(Item.attempts).where(Item.job_id == job_id)))
    assert attempts == [1] * ITEMS


def test_redis_flushed_mid_job(isolated: Stack) -> None:
    isolated.start_both()
    job_id = start_job(isolated)
    with redis_client(isolated.settings.redis) as client:
        client.flushdb()
    assert_exactly_once(isolated, job_id)


def test_api_restarted_mid_job(isolated: Stack) -> None:
    _, api = isolated.start_both()
    job_id = start_job(isolated)
    api.stop()
    isolated.start_api()
    assert_exactly_once(isolated, job_id)


def test_sigterm_finishes_the_current_chunk_so_a_rolling_restart_runs_nothing_twice(isolated: Stack) -> None:
    first, _ = isolated.start_both()
    job_id = start_job(isolated)
    [name] = isolated.worker_names()
    assert worker_row(isolated, name) == "alive"
    assert first.stop(signal.SIGTERM, timeout=60) == 0, first.output()  # Celery's warm/soft shutdown
    assert worker_row(isolated, name) is None  # stopped, not dead: the console no longer lists it
    assert "shutdown" in first.output().lower()
    with sessions(isolated.settings)() as session:
        states = list(session.scalars(select(Item.state).where(Item.job_id == job_id)))
    assert "running" not in states, "SIGTERM must not leave an item half-run"
    assert states.count("succeeded") < ITEMS, "the SIGTERM must land mid-job"
    isolated.start_worker()
    assert_exactly_once(isolated, job_id)
    with sessions(isolated.settings)() as session:
        attempts = list(session.scalars(select(Item.attempts).where(Item.job_id == job_id)))
    assert attempts == [1] * ITEMS  # unlike a kill, a graceful stop re-runs nothing
