"""Batch scheduling (jobs/dispatch.py) on the session's worker: concurrent jobs of two owners progress together
instead of first come, first served, and a job with a near deadline overtakes one submitted before it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, wait_for
from jobs.keys import KeyStore
from tests.helpers import MODEL, submit, wait_done


def items(n: int, word: str) -> list[dict]:
    return [{"prompt": f"{word} {i}: count to {i}.", "options": {"num_predict": 8, "temperature": 0.7}} for i in range(n)]


def done(base: str, job_id: str, headers: dict[str, str] | None = None) -> int:
    counts = httpx.get(f"{base}/api/jobs/{job_id}", headers=headers, timeout=30).json()["counts"]
    return int(counts["succeeded"] + counts["failed"])


@pytest.fixture(scope="module")
def keyed(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API with keys required in front of the session's worker and database: jobs get owners."""
    own = settings.model_copy(update={"require_api_key": True, "host": f"127.0.0.1:{free_port()}"})
    server = Stack(own, tmp_path_factory.mktemp("scheduling-logs"))
    server.start_api()
    yield server
    server.stop()


def test_two_owners_jobs_progress_at_equal_rates(keyed: Stack, settings: Settings) -> None:
    keys = KeyStore(settings)
    owners = [{"Authorization": f"Bearer {keys.create(name)[0]}"} for name in ("team-a", "team-b")]
    jobs = []
    for headers, word in zip(owners, ("alpha", "beta")):
        r = httpx.post(keyed.base_url + "/api/jobs", headers=headers, timeout=60,
                       json={"model": MODEL, "kind": "generate", "chunk_size": 2, "items": items(24, word)})
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    samples: list[tuple[int, int]] = []

    def finished() -> bool:
        samples.append((done(keyed.base_url, jobs[0], owners[0]), done(keyed.base_url, jobs[1], owners[1])))
        return samples[-1] == (24, 24)

    wait_for(finished, 300, "both jobs to finish", interval=0.25)
    # First come, first served would leave team b at 0 until team a's job ends; a fair share keeps them level,
    # after the few chunks team a had queued before team b's job arrived.
    at_half = next(b for a, b in samples if a >= 12)
    at_end = next(b for a, b in samples if a >= 24)
    changes = [s for i, s in enumerate(samples) if i == 0 or s != samples[i - 1]]  # the whole run, compact
    assert at_half >= 4 and at_end >= 12, f"team b had {at_half} when a had 12 and {at_end} at its end: {changes}"


def test_a_near_deadline_overtakes_an_earlier_job(base_url: str) -> None:
    first = submit(base_url, kind="generate", chunk_size=2, items=items(24, "slow"))
    urgent = submit(base_url, kind="generate", chunk_size=2, completion_window="1h", priority=1, items=items(4, "quick"))
    assert urgent["priority"] == 1 and urgent["expires_at"] is not None
    assert wait_done(base_url, urgent["id"])["status"] == "completed"
    assert done(base_url, first["id"]) <= 16  # the urgent job did not wait for the whole earlier one
    assert wait_done(base_url, first["id"])["status"] == "completed"


def test_a_bad_window_or_priority_is_a_400(base_url: str) -> None:
    for extra in ({"completion_window": "soon"}, {"priority": 11}):
        r = httpx.post(base_url + "/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], **extra})
        assert r.status_code == 400, r.text
