"""Jobs used against the server, with real workers and Redis (issue #33): one key's result cache never answers
another key (a hit and its ``created_at`` would tell it that someone ran that prompt, and when) unless the
admin shares it; a dry run counts against the key's request rate and its counted tokens are capped.  What
needs no worker (the line cap, the size of what a dry run puts in Redis, its usage): tests/api/test_hostile.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, wait_for
from jobs.keys import KeyLimits, KeyStore
from tests.helpers import MODEL, own_stack

TOKEN_CAP = 120  # CORRAL_DRY_RUN_MAX_TOKENS of the guarded API


@pytest.fixture(scope="module")
def guarded(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API server with keys required and a small dry-run token cap, in front of the session's worker."""
    own = settings.model_copy(update={"require_api_key": True, "host": f"127.0.0.1:{free_port()}",
                                      "dry_run_max_tokens": TOKEN_CAP})
    server = Stack(own, tmp_path_factory.mktemp("guarded"))
    server.start_api()
    yield server
    server.stop()


def auth(settings: Settings, name: str, limits: KeyLimits | None = None) -> dict[str, str]:
    key, _ = KeyStore(settings).create(name, limits=limits)
    return {"Authorization": f"Bearer {key}"}


def item(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "options": {"temperature": 0, "num_predict": 4}}


def run_job(url: str, headers: dict[str, str], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit a ``cache: true`` job as the key, wait for its end, and return its result lines."""
    r = httpx.post(url + "/api/jobs", headers=headers, timeout=60,
                   json={"model": MODEL, "kind": "generate", "cache": True, "items": items})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for(lambda: httpx.get(f"{url}/api/jobs/{job_id}", headers=headers).json()["status"] == "completed", 180,
             f"job {job_id}", interval=0.3)
    lines = httpx.get(f"{url}/api/jobs/{job_id}/results", headers=headers, timeout=60).text.splitlines()
    return [json.loads(line) for line in lines]


def test_cache_hit_never_crosses_keys(guarded: Stack) -> None:
    a = auth(guarded.settings, "tenant-a")
    b = auth(guarded.settings, "tenant-b")
    prompt = item("Name one tenant of an old house.")
    first = run_job(guarded.base_url, a, [prompt])
    assert "cached" not in first[0]
    theirs = run_job(guarded.base_url, b, [prompt])
    assert "cached" not in theirs[0]  # B's item ran: nothing tells B that A ever sent this prompt
    assert theirs[0]["response"]["eval_count"] > 0 and theirs[0]["response"]["created_at"] != first[0]["response"]["created_at"]
    again = run_job(guarded.base_url, a, [prompt])  # A's own repeat still comes from A's cache
    assert again[0]["cached"] is True and again[0]["response"] == first[0]["response"]


def test_an_admin_can_share_the_result_cache_across_keys(settings: Settings, tmp_path: Path) -> None:
    with own_stack(settings, tmp_path, 11, require_api_key=True, result_cache_shared=True) as shared:
        a = auth(shared.settings, "sharing-a")
        b = auth(shared.settings, "sharing-b")
        prompt = item("Name one shared garden plant.")
        first = run_job(shared.base_url, a, [prompt])
        theirs = run_job(shared.base_url, b, [prompt])
        assert theirs[0]["cached"] is True and theirs[0]["response"] == first[0]["response"]


def dry_run(url: str, headers: dict[str, str], items: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(url + "/api/jobs", params={"dry_run": "true"}, headers=headers, timeout=120,
                      json={"model": MODEL, "kind": "generate", "items": items})


def test_dry_run_counts_against_request_rate(guarded: Stack) -> None:
    headers = auth(guarded.settings, "two-dry-runs-a-minute", KeyLimits(rpm=2))
    answers = [dry_run(guarded.base_url, headers, [item("Count me.")]) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429], [r.text for r in answers]
    assert answers[2].json() == {"error": "rate limit reached: 2 requests per minute for the key 'two-dry-runs-a-minute'"}
    assert 50 <= int(answers[2].headers["Retry-After"]) <= 60
    usage = httpx.get(guarded.base_url + "/api/usage", headers=headers).json()["usage"]
    assert [u["requests"] for u in usage] == [2]  # the two it ran; the refused one ran nothing


def test_dry_run_over_token_cap_is_413(guarded: Stack) -> None:
    headers = auth(guarded.settings, "long-prompts")
    small = dry_run(guarded.base_url, headers, [item("A short prompt.")])
    assert small.status_code == 200 and 0 < small.json()["prompt_tokens"] <= TOKEN_CAP
    long = dry_run(guarded.base_url, headers, [item("word " * 200)])
    assert long.status_code == 413
    error = long.json()["error"]
    assert error.startswith(f"a dry run counts at most {TOKEN_CAP} prompt tokens (CORRAL_DRY_RUN_MAX_TOKENS): "), error
    assert error.endswith("were counted by line 1; dry-run a sample of the job")
