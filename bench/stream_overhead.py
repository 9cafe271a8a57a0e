"""What the stack adds to time to first token: HTTP -> Celery -> worker -> Redis stream -> HTTP, vs in-process.

    .venv/bin/python bench/stream_overhead.py [--requests 50]

Both paths run the same greedy ``/api/generate``-style request (the same prompt, rendered with the model's chat
template) on a warm SmolLM2-135M Q4_1 with the same decode loop, one request at a time:
1. in this process: ``LoadedModel.generate`` until its first piece of text;
2. through corral: a streaming ``POST /api/generate`` until the first chunk with text, as a client sees it.
Prints p50/p95 of each and the difference (what the API, Redis, Celery and the stream add).
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import corral_stack, model_path, print_table  # noqa: E402

PROMPT = "Why is the sky blue?"


def in_process(model: Path, n: int, threads: int) -> list[float]:
    from workers.engine import LoadedModel, LoadSpec

    engine = LoadedModel(LoadSpec(path=model, embedding=False, n_ctx=4096, n_gpu_layers=0, n_threads=threads))
    times = []
    for i in range(n + 2):
        started = time.perf_counter()
        first: list[float] = []

        def on_text(_: str) -> bool:
            if not first:
                first.append(time.perf_counter() - started)
            return False

        prompt, stops = engine.chat_prompt([{"role": "user", "content": PROMPT}])
        engine.generate(prompt, {"temperature": 0, "num_predict": 4}, stops=stops, fmt=None, on_text=on_text,
                        cancelled=lambda: False)
        if i >= 2:  # two warm-up requests
            times.append(first[0] * 1000)
    engine.close()
    return times


def through_stack(home: Path, n: int) -> list[float]:
    times = []
    body = {"model": "smollm2", "prompt": PROMPT, "options": {"temperature": 0, "num_predict": 4}}
    with corral_stack(home) as stack, httpx.Client(base_url=stack.base_url, timeout=120) as client:
        for i in range(n + 2):
            started = time.perf_counter()
            first = None
            with client.stream("POST", "/api/generate", json=body) as r:
                for line in r.iter_lines():
                    if first is None and json.loads(line).get("response"):
                        first = time.perf_counter() - started
            if i >= 2:
                times.append((first or 0.0) * 1000)
    return times


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        local = in_process(model_path(home, "smollm2"), args.requests, args.threads)
        stack = through_stack(home, args.requests)
    rows = [
        ["in-process LoadedModel.generate", percentile(local, 50), percentile(local, 95)],
        ["through corral (HTTP, Celery, Redis stream)", percentile(stack, 50), percentile(stack, 95)],
        ["added by the stack", percentile(stack, 50) - percentile(local, 50), percentile(stack, 95) - percentile(local, 95)],
    ]
    print_table(
        f"time to first token over {args.requests} sequential requests, SmolLM2-135M Q4_1, {args.threads} threads",
        ["path", "p50 ms", "p95 ms"], rows,
    )


if __name__ == "__main__":
    main()
