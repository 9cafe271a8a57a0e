"""Concurrent streaming chat: 8 clients at once vs the same 8 requests one after another, through corral.

    .venv/bin/python bench/concurrent_chat.py [--clients 8] [--tokens 64] [--slots 8] [--cpu-weights auto]

Starts a real API server and worker (``OLLAMA_NUM_PARALLEL=--slots``), warms the model, then sends
``--clients`` streaming ``/api/chat`` requests (greedy, ``num_predict=--tokens``) one after another and then all
at once, and prints the aggregate tokens per second (tokens from each final chunk's ``eval_count`` over the
wall time) and the p50/p95 time to the first content chunk as each client sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table
from corral.settings import CpuWeights

TOPICS = ["a dragon who collects teapots", "a robot learning to paint", "a lighthouse keeper's last night",
          "a cat that runs a bakery", "two brothers building a boat", "a clockmaker who stops time",
          "the last tree in a city", "a shy wizard's first spell", "a river that flows uphill",
          "an astronaut growing tomatoes", "a pirate afraid of water", "a snowman in summer"]


def chat(url: str, topic: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, tokens generated) for one streaming chat."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "options": {"temperature": 0, "num_predict": tokens}}
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/api/chat", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            chunk = json.loads(line)
            if first is None and chunk.get("message", {}).get("content"):
                first = time.perf_counter() - started
            if chunk.get("done"):
                return first or 0.0, int(chunk["eval_count"])
    raise RuntimeError("stream ended without a final chunk")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--cpu-weights", choices=get_args(CpuWeights), default="auto",
                        help="the worker's CORRAL_CPU_WEIGHTS (auto: a Q8_0 copy of the Q4_1 model)")
    args = parser.parse_args()
    topics = [TOPICS[i % len(TOPICS)] for i in range(args.clients)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model_path(home, "smollm2")
        with corral_stack(home, num_parallel=args.slots, cpu_weights=args.cpu_weights) as stack:
            url = stack.base_url
            chat(url, "warming up", 4)
            started = time.perf_counter()
            one_by_one = [chat(url, t, args.tokens) for t in topics]
            sequential_wall = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                together = list(pool.map(lambda t: chat(url, t, args.tokens), topics))
            concurrent_wall = time.perf_counter() - started
    sequential_rate = sum(n for _, n in one_by_one) / sequential_wall
    for name, results, wall in (("one after another", one_by_one, sequential_wall),
                                (f"{args.clients} at once", together, concurrent_wall)):
        rate = sum(n for _, n in results) / wall
        ttft = [t * 1000 for t, _ in results]
        rows.append([name, rate, percentile(ttft, 50), percentile(ttft, 95), f"{rate / sequential_rate:.2f}x"])
    print_table(
        f"{args.clients} streaming /api/chat clients x {args.tokens} tokens, {args.slots} slots, SmolLM2-135M Q4_1, "
        f"CORRAL_CPU_WEIGHTS={args.cpu_weights}",
        ["requests", "aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "vs one after another"], rows,
    )


if __name__ == "__main__":
    main()
