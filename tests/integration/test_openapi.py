"""``/openapi.json`` covers every route, and schemathesis finds no server error and no off-schema reply in it.

The fuzzing runs against a stack of its own (its own SQLite file and Redis database, an API server and a worker
with the real models, whose examples in the schemas reach them), so the files and jobs it creates cannot
disturb the other tests.  ``num_ctx`` defaults to 256 there and ``CORRAL_MAX_PREDICT`` caps every generation at
32 tokens, so a generated request with a huge ``num_predict`` or ``num_ctx`` still ends within seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from corral.settings import Settings
from tests.helpers import Stack, own_stack

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 20
MIN_CASES = 500


@pytest.fixture(scope="module")
def fuzz_stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(settings, tmp_path_factory.mktemp("fuzz"), 3, context_length=256, max_predict=32) as stack:
        yield stack


def test_generation_is_capped_by_corral_max_predict(fuzz_stack: Stack) -> None:
    """The fuzz stack runs with CORRAL_MAX_PREDICT=32: an unlimited or huge num_predict generates at most 32."""
    for limit in (-1, 100_000):
        body = {"model": "smollm2", "prompt": "Count from one to a thousand.", "stream": False,
                "options": {"num_predict": limit, "temperature": 0}}
        reply = httpx.post(fuzz_stack.base_url + "/api/generate", json=body, timeout=120).json()
        assert 0 < reply["eval_count"] <= 32, reply



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
