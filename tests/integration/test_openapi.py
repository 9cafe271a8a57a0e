"""``/openapi.json`` covers every route, and schemathesis finds no server error and no off-schema reply in it.

The fuzzing runs against a stack of its own (its own SQLite file and Redis database, an API server and a worker
with the real models, whose examples in the schemas reach them), so the files and jobs it creates cannot
disturb the other tests.  ``num_ctx`` defaults to 256 there and ``CORRAL_MAX_PREDICT`` caps every generation at
8 tokens, so a generated request with a huge ``num_predict`` or ``num_ctx`` still ends within seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from corral.settings import Settings
from harness.stack import Stack
from tests.helpers import own_stack

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 4  # per operation and phase, over every operation (the whole suite has 10 minutes)
MIN_CASES = 300


@pytest.fixture(scope="module")
def fuzz_stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # No registry host is allowed: made-up names like 127.0.0.1:<port>/x would otherwise be pulled from a port
    # nothing listens on, and a registry that cannot be reached is Ollama's 500 (a 5xx the run must not see).
    with own_stack(settings, tmp_path_factory.mktemp("fuzz"), 3, context_length=256, max_predict=8,
                   pull_hosts=["registry.invalid"]) as stack:
        yield stack


def test_generation_is_capped_by_corral_max_predict(fuzz_stack: Stack) -> None:
    """The fuzz stack runs with CORRAL_MAX_PREDICT=8: an unlimited or huge num_predict generates at most 8."""
    for limit in (-1, 100_000):
        body = {"model": "smollm2", "prompt": "Count from one to a thousand.", "stream": False,
                "options": {"num_predict": limit, "temperature": 0}}
        reply = httpx.post(fuzz_stack.base_url + "/api/generate", json=body, timeout=120).json()
        assert 0 < reply["eval_count"] <= 8, reply



def test_schemathesis_finds_no_server_error_and_no_reply_off_its_schema(fuzz_stack: Stack) -> None:
    """Property-based requests to every operation: 0 responses 5xx, every reply valid against its schema."""
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", fuzz_stack.base_url + "/openapi.json",
        "--url", fuzz_stack.base_url,
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--phases", "examples,coverage,fuzzing",
        "--seed", "1",
        "--workers", "2",
        "--request-timeout", "30",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    cases = sum(int(n) for n in re.findall(r"(\d+) generated", output)) or _cases_from(output)
    assert cases >= MIN_CASES, output[-3000:]


def _cases_from(output: str) -> int:
    match = re.search(r"Test cases:\s*\n?\s*(\d+)", output) or re.search(r"(\d+) test cases", output)
    return int(match.group(1)) if match else 0


def edge_requests() -> list[tuple[str, dict[str, object]]]:
    """Each option at both ends of its range and just past them, format schemas at and past the grammar
    budget, context ids at and past the vocabulary's ends: what reaches llama.cpp in a shared worker."""
    from corral.options import OPTION_RANGES

    base = {"model": "smollm2", "prompt": "Hi", "stream": False}
    cases: list[tuple[str, dict[str, object]]] = []
    for key, (low, high) in OPTION_RANGES.items():
        step = 1 if key not in ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                                "frequency_penalty") else 0.5
        for value in (low, high, low - step, high + step):
            number = int(value) if step == 1 else float(value)
            cases.append(("/api/generate", {**base, "options": {"num_predict": 2, key: number}}))
    for bound in (1000, 1001, 20000):
        cases.append(("/api/generate", {**base, "format": {"type": "string", "maxLength": bound},
                                        "options": {"num_predict": 4}}))
    cases.append(("/api/chat", {"model": "smollm2", "stream": False, "messages": [{"role": "user", "content": "Hi"}],
                                "format": {"type": "array", "items": {"type": "integer"}, "maxItems": 100000}}))
    for ids in ([0], [49151], [49152], [-1], [2**31]):
        cases.append(("/api/generate", {**base, "context": ids, "options": {"num_predict": 2}}))
    return cases


def test_edge_values_get_answers_and_never_take_the_worker_down(fuzz_stack: Stack) -> None:
    """Every edge value is either served or refused with a 4xx; the worker that served the first request still
    serves the last (no crash, no exit), and an ordinary request still works."""
    # the property-based run may have deleted or copied over the model (its examples name it): put it back
    pulled = httpx.post(fuzz_stack.base_url + "/api/pull", json={"model": "smollm2", "stream": False}, timeout=300)
    assert pulled.json() == {"status": "success"}
    workers = set(fuzz_stack.worker_names())
    seen: list[tuple[int, str]] = []
    for path, body in edge_requests():
        r = httpx.post(fuzz_stack.base_url + path, json=body, timeout=300)
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        seen.append((r.status_code, json.dumps(body)[:80]))
    assert set(fuzz_stack.worker_names()) == workers, "the worker died (or was replaced) during the edge values"
    assert {code for code, _ in seen} == {200, 400}, seen
    ok = httpx.post(fuzz_stack.base_url + "/api/generate", timeout=120,
                    json={"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 3, "temperature": 0}})
    assert ok.status_code == 200 and ok.json()["eval_count"] == 3
