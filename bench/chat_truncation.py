"""What fitting a long chat into ``num_ctx`` costs the worker: one ``/api/chat`` of N tiny messages at num_ctx 256.

    .venv/bin/python bench/chat_truncation.py [--sizes 1,2000,20000] [--repeats 3]

Each chat is N alternating user/assistant messages of a few words and asks for one token, so the time is the
request's round trip plus the fitting (workers/fitting.py: counting each message's tokens once, then a render
of what fits).  The one-message chat in the same run is the anchor: the difference is what the long chat adds.
Before the fitting was linear, 2,000 messages took 240 s of worker time (issue #33, item 6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table


def chat(n: int) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"message {i}: a few words"} for i in range(n - 1)] + [
        {"role": "user", "content": "Say hi."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,2000,20000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    home = Path(tempfile.mkdtemp(prefix="corral-bench-trunc-"))
    model_path(home, "smollm2:135m")
    times: dict[int, list[float]] = {n: [] for n in sizes}
    prompts: dict[int, int] = {}
    with corral_stack(home) as running, httpx.Client(base_url=running.base_url, timeout=600) as client:
        options = {"num_ctx": 256, "num_predict": 1, "temperature": 0}
        client.post("/api/chat", json={"model": "smollm2", "messages": chat(1), "stream": False, "options": options})
        for _ in range(args.repeats):
            for n in sizes:  # alternating, so a busy moment of the machine hits every size alike
                body = {"model": "smollm2", "messages": chat(n), "stream": False, "options": options}
                started = time.perf_counter()
                reply = client.post("/api/chat", json=body)
                times[n].append(time.perf_counter() - started)
                reply.raise_for_status()
                prompts[n] = reply.json()["prompt_eval_count"]
    anchor = statistics.median(times[sizes[0]])
    rows = [[f"{n:,}", prompts[n], statistics.median(times[n]) * 1000, (statistics.median(times[n]) - anchor) * 1000]
            for n in sizes]
    print_table(f"/api/chat at num_ctx 256, median of {args.repeats}", ["messages", "prompt tokens kept",
                "round trip ms", f"added vs {sizes[0]} message(s), ms"], rows)


if __name__ == "__main__":
    main()
