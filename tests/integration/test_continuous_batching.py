"""Continuous batching in a real worker: many sequences share each decode, and nobody can tell from the output.

A stack of its own with ``OLLAMA_NUM_PARALLEL=16``, so that 16 prompts really decode together.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from corral.settings import Settings
from harness.stack import Stack, wait_for
from tests.helpers import MODEL, own_stack

pytestmark = pytest.mark.slow

SUBJECTS = [
    "a dragon", "a small robot", "the old lighthouse keeper", "a lost cat", "two brothers", "a clockmaker",
    "the last tree", "a shy wizard", "a river", "an astronaut", "the baker's daughter", "a pirate ship",
    "a snowman", "a village", "the moon", "a young fox",
]
GREEDY = {"temperature": 0, "num_predict": 32}


@pytest.fixture(scope="module")
def wide(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(settings, tmp_path_factory.mktemp("wide"), 2, num_parallel=16) as stack:
        yield stack


def generate(base_url: str, prompt: str, **options: Any) -> dict:
    body = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": {**GREEDY, **options}}
    r = httpx.post(base_url + "/api/generate", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


ALONE = 6  # prompts also run one at a time (the other 10 are there to share their decodes)


def test_greedy_output_is_the_same_alone_and_among_16(wide: Stack) -> None:
    prompts = [f"Once upon a time, {s}" for s in SUBJECTS]
    alone = [generate(wide.base_url, p)["response"] for p in prompts[:ALONE]]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: generate(wide.base_url, p)["response"], prompts))
    assert len(set(together)) == len(prompts), "the prompts must lead to different stories"
    assert together[:ALONE] == alone

    # A batch job feeds a whole chunk into the loop at once: same text again.
    body = {
        "model": MODEL, "kind": "generate", "chunk_size": 16, "options": GREEDY,
        "items": [{"custom_id": str(i), "prompt": p, "raw": True} for i, p in enumerate(prompts)],
    }
    r = httpx.post(wide.base_url + "/api/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for(
        lambda: httpx.get(f"{wide.base_url}/api/jobs/{job_id}").json()["status"] == "completed",
        180, "the job", interval=0.3,
    )
    lines = [json.loads(x) for x in httpx.get(f"{wide.base_url}/api/jobs/{job_id}/results", timeout=60).text.splitlines()]
    assert [line["response"]["response"] for line in lines] == together


def test_each_sequence_keeps_its_own_settings_in_a_shared_batch(wide: Stack) -> None:
    """Grammar, stop strings, token limits and seeds are per sequence, not per decode."""
    story = "Once upon a time, a dragon"
    requests = {
        "json": {"prompt": "Describe a cat as JSON with keys name and color.", "format": "json", "raw": False,
                 "options": {"temperature": 0, "num_predict": 48}},
        "stop": {"prompt": story, "options": {"temperature": 0, "num_predict": 64, "stop": ["."]}},
        "short": {"prompt": story, "options": {"temperature": 0, "num_predict": 3}},
        "seed-a": {"prompt": story, "options": {"temperature": 1.2, "seed": 7, "num_predict": 24}},
        "seed-b": {"prompt": story, "options": {"temperature": 1.2, "seed": 7, "num_predict": 24}},
        "greedy": {"prompt": story, "options": {"temperature": 0, "num_predict": 24}},
    }

    def run(name: str) -> tuple[str, dict]:
        body = {"model": MODEL, "stream": False, "raw": True, **requests[name]}
        r = httpx.post(wide.base_url + "/api/generate", json=body, timeout=180)
        assert r.status_code == 200, r.text
        return name, r.json()

    with ThreadPoolExecutor(len(requests)) as pool:
        out = dict(pool.map(run, list(requests)))
    parsed = json.loads(out["json"]["response"])  # grammar held although its neighbours had none
    assert isinstance(parsed, dict)
    assert "." not in out["stop"]["response"] and out["stop"]["done_reason"] == "stop"
    assert out["stop"]["eval_count"] < 64
    assert out["short"]["eval_count"] == 3 and out["short"]["done_reason"] == "length"
    assert out["seed-a"]["response"] == out["seed-b"]["response"]  # same seed, same sample, side by side
    assert out["greedy"]["response"] != out["seed-a"]["response"]
    alone = generate(wide.base_url, story, num_predict=24)["response"]
    assert out["greedy"]["response"] == alone


def test_a_new_request_joins_a_running_generation_instead_of_waiting_for_it(wide: Stack) -> None:
    """Continuous batching as a user sees it: a short request finishes while a long one is still streaming."""
    events: list[str] = []
    long_started = threading.Event()

    def long_stream() -> None:
        body = {"model": MODEL, "prompt": "Once upon a time, a river", "raw": True,
                "options": {"temperature": 0, "num_predict": 400, "stop": []}}
        with httpx.stream("POST", wide.base_url + "/api/generate", json=body, timeout=180) as r:
            for line in r.iter_lines():
                chunk = json.loads(line)
                if chunk.get("response"):
                    long_started.set()
                if chunk.get("done"):
                    events.append(f"long done: {chunk['eval_count']}")

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert long_started.wait(120)
    short = generate(wide.base_url, "Once upon a time, a cat", num_predict=5)
    events.append("short done")
    thread.join(180)
    assert short["eval_count"] == 5
    assert events[0] == "short done", events  # the short one did not queue behind the long one
    assert events[1].startswith("long done")
