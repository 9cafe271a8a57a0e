"""What the stack adds to time to first token: HTTP -> Redis list -> worker lane -> Redis stream -> HTTP, vs in-process.

    .venv/bin/python bench/stream_overhead.py [--requests 50]

Both paths run the same greedy ``/api/generate``-style request (the same prompt, rendered with the model's chat
template) on a warm SmolLM2-135M Q4_1 with the same decode loop, one request at a time, alternating:
1. in this process: ``LoadedModel.generate`` until its first piece of text;
2. through corral: a streaming ``POST /api/generate`` until the first chunk with text, as a client sees it.
Prints p50/p95 of each and the difference (what the API, Redis, Celery and the stream add).  ``--pause``
(default 50 ms) separates the requests: llama.cpp's OpenMP threads spin for a while after a decode, and
without a pause the in-process engine's spinning threads took the cores from the worker's next request
(measured on 2 cores: 15.2 ms added without a pause, 8.2-9.4 with one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table

PROMPT = "Why is the sky blue?"


def in_process_ttft(engine: Any) -> float:
    """Milliseconds from the request to its first piece of text, straight through the decode loop."""
    started = time.perf_counter()
    first: list[float] = []

    def on_text(_: str) -> bool:
        if not first:
            first.append(time.perf_counter() - started)
        return False

    prompt, stops = engine.chat_prompt([{"role": "user", "content": PROMPT}])
    engine.generate(prompt, {"temperature": 0, "num_predict": 4}, stops=stops, fmt=None, on_text=on_text,
                    cancelled=lambda: False)
    return first[0] * 1000


def stack_ttft(client: httpx.Client) -> float:
    """Milliseconds from sending ``POST /api/generate`` to the first chunk with text, as a client sees it."""
    body = {"model": "smollm2", "prompt": PROMPT, "options": {"temperature": 0, "num_predict": 4}}
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/api/generate", json=body) as r:
        for line in r.iter_lines():
            if first is None and json.loads(line).get("response"):
                first = time.perf_counter() - started
    return (first or 0.0) * 1000


def measure(home: Path, n: int, threads: int, pause: float) -> tuple[list[float], list[float]]:
    """Alternate the two paths request by request, so drift in the machine's speed hits both alike."""
    from workers.engine import LoadedModel, LoadSpec

    engine = LoadedModel(LoadSpec(path=model_path(home, "smollm2"), embedding=False, n_ctx=4096, n_gpu_layers=0,
                                  n_threads=threads))
    local: list[float] = []
    stack: list[float] = []
    try:
        with corral_stack(home) as running, httpx.Client(base_url=running.base_url, timeout=120) as client:
            for i in range(n + 2):
                a = in_process_ttft(engine)
                time.sleep(pause)  # let this process's OpenMP threads stop spinning before the worker runs
                b = stack_ttft(client)
                time.sleep(pause)
                if i >= 2:  # two warm-up rounds
                    local.append(a)
                    stack.append(b)
    finally:
        engine.close()
    return local, stack


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds between requests, so one path's spinning OpenMP threads do not slow the other")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        local, stack = measure(Path(tmp), args.requests, args.threads, args.pause)
    paired = [b - a for a, b in zip(local, stack)]
    rows = [
        ["in-process LoadedModel.generate", percentile(local, 50), percentile(local, 95)],
        ["through corral (HTTP, interactive lane, Redis stream)", percentile(stack, 50), percentile(stack, 95)],
        ["added by the stack", percentile(stack, 50) - percentile(local, 50), percentile(stack, 95) - percentile(local, 95)],
        ["added, paired (each round's difference)", percentile(paired, 50), percentile(paired, 95)],
    ]
    print_table(
        f"time to first token over {args.requests} sequential requests, SmolLM2-135M Q4_1, {args.threads} threads",
        ["path", "p50 ms", "p95 ms"], rows,
    )


if __name__ == "__main__":
    main()
