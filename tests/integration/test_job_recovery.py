"""Nothing lost, nothing duplicated: real processes killed, Redis flushed, the API restarted mid-job."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import redis
from sqlalchemy import select

from jobs.db import sessions
from jobs.models import Item
from tests.conftest import MODEL
from tests.stack import Stack, wait_for

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
        120, "the job to complete", interval=0.5,
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


def test_worker_killed_mid_job_then_a_new_worker_finishes_it(isolated: Stack) -> None:
    first = isolated.start_worker()
    isolated.start_api()
    job_id = start_job(isolated)
    first.stop(signal.SIGKILL)
    assert counts(isolated, job_id)["succeeded"] < ITEMS, "the kill must land mid-job"
    isolated.start_worker()
    assert_exactly_once(isolated, job_id)
    with sessions(isolated.settings)() as session:
        attempts = list(session.scalars(select(Item.attempts).where(Item.job_id == job_id)))
    assert max(attempts) <= 2 and sum(attempts) <= ITEMS + 1  # at most the item in flight ran twice


def test_redis_flushed_mid_job(isolated: Stack) -> None:
    isolated.start_worker()
    isolated.start_api()
    job_id = start_job(isolated)
    redis.Redis.from_url(isolated.settings.redis).flushdb()
    assert_exactly_once(isolated, job_id)


def test_api_restarted_mid_job(isolated: Stack) -> None:
    isolated.start_worker()
    api = isolated.start_api()
    job_id = start_job(isolated)
    api.stop()
    isolated.start_api()
    assert_exactly_once(isolated, job_id)


def test_sigterm_finishes_the_current_chunk_so_a_rolling_restart_runs_nothing_twice(isolated: Stack) -> None:
    first = isolated.start_worker()
    isolated.start_api()
    job_id = start_job(isolated)
    assert first.stop(signal.SIGTERM, timeout=60) == 0, first.output()  # Celery's warm/soft shutdown
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
