"""Load: 64 concurrent clients for a fixed time against chat, embed and job status, through a real stack.

    .venv/bin/python bench/load.py [--clients 64] [--seconds 60] [--max-queue 16]
    .venv/bin/python bench/load.py --enforcement 2000     # what per-key limits add to a request

Starts an API server and a worker (``OLLAMA_MAX_QUEUE=--max-queue``), submits one small batch job, then runs
``--clients`` threads, each with its own HTTP connection, for ``--seconds``.  Each client loops over a fixed mix:
a non-streaming ``/api/chat`` (16 tokens), an ``/api/embed`` of one sentence, and a ``GET /api/jobs/{id}``.
Prints per route: requests, throughput, error rate, p50/p95 latency and the status codes seen.  The only
errors expected are Ollama's 503 "server busy, please try again.  maximum pending requests exceeded" for
interactive requests past the queue bound; anything else is a defect.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table

MIX = ("chat", "embed", "status")


def request(client: httpx.Client, route: str, job_id: str, n: int) -> httpx.Response:
    if route == "chat":
        return client.post("/api/chat", json={
            "model": "smollm2", "stream": False, "options": {"num_predict": 16, "temperature": 0},
            "messages": [{"role": "user", "content": f"Name a color, number {n}."}]})
    if route == "embed":
        return client.post("/api/embed", json={"model": "all-minilm", "input": f"sentence number {n} about rivers"})
    return client.get(f"/api/jobs/{job_id}")


def client_loop(url: str, job_id: str, offset: int, stop: float, out: list[tuple[str, int, float, str]]) -> None:
    n = offset
    with httpx.Client(base_url=url, timeout=300) as client:
        while time.perf_counter() < stop:
            route = MIX[n % len(MIX)]
            started = time.perf_counter()
            try:
                r = request(client, route, job_id, n)
                status, body = r.status_code, r.text[:200] if r.status_code >= 400 else ""
            except httpx.HTTPError as exc:
                status, body = 0, f"{type(exc).__name__}: {exc}"
            out.append((route, status, time.perf_counter() - started, body))
            n += 1


def enforcement(requests: int) -> None:
    """What per-key limits add to a request: the API's admission (allow-list, rpm moving window, tpm and budget
    windows, open-request set) and its accounting at the end, against a real Redis, with every limit set and
    none of them reached.  Keys off (no principal) costs nothing, so this is the whole added latency."""
    from api.governance import Governor
    from corral.settings import Settings
    from harness.processes import redis_or_private
    from jobs.keys import KeyLimits, Principal

    class NoDatabase:  # accounting is written by a background thread once a second: not on the request's path
        def add_usage(self, amounts: Any) -> None:
            pass

    with tempfile.TemporaryDirectory() as home, redis_or_private(None, Path(home)) as url:
        governor = Governor(Settings(home=Path(home), redis_url=url), NoDatabase())  # type: ignore[arg-type]
        limits = KeyLimits(rpm=10**9, tpm=10**12, max_concurrent=10**6, token_budget=10**15, budget_period="30d",
                           models=["smollm2*", "all-minilm*"])
        who = Principal("key_bench", "bench", False, limits)
        admit, finish = [], []
        for _ in range(requests):
            started = time.perf_counter()
            ticket = governor.admit(who, "smollm2")
            admitted = time.perf_counter()
            governor.finish(ticket, prompt=30, generated=16)
            governor.release(ticket)
            admit.append((admitted - started) * 1000)
            finish.append((time.perf_counter() - admitted) * 1000)
        total = [a + f for a, f in zip(admit, finish)]
        rows = [[name, statistics.median(v), statistics.quantiles(v, n=20)[18]]
                for name, v in (("admission (before the request runs)", admit),
                                ("accounting + release (after it ends)", finish), ("added per request", total))]
        print_table(f"Per-key limit enforcement, {requests} requests, every limit set (ms)",
                    ["step", "p50", "p95"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--enforcement", type=int, metavar="N", default=0,
                        help="Only measure what per-key limits add to N requests (in-process, real Redis).")
    args = parser.parse_args()
    if args.enforcement:
        enforcement(args.enforcement)
        return
    results: list[tuple[str, int, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model_path(home, "smollm2")
        with corral_stack(home, max_queue=args.max_queue, api_threads=max(args.clients + 8, 32)) as stack:
            url = stack.base_url
            with httpx.Client(base_url=url, timeout=300) as client:
                for route in ("chat", "embed"):
                    request(client, route, "", 0).raise_for_status()  # load both models
                job = client.post("/api/jobs", json={
                    "model": "smollm2", "kind": "generate", "options": {"num_predict": 8},
                    "items": [{"prompt": f"Say {i}."} for i in range(8)]}).json()
            stop = time.perf_counter() + args.seconds
            threads = [threading.Thread(target=client_loop, args=(url, job["id"], i, stop, results))
                       for i in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - started
    rows: list[list[Any]] = []
    unexpected: list[str] = []
    for route in MIX + ("all",):
        mine = [r for r in results if route in ("all", r[0])]
        if not mine:
            continue
        codes = collections.Counter(status for _, status, _, _ in mine)
        errors = sum(n for code, n in codes.items() if code != 200)
        latencies = sorted(seconds * 1000 for _, _, seconds, _ in mine)
        p95 = statistics.quantiles(latencies, n=100)[94] if len(latencies) > 1 else latencies[0]
        rows.append([route, len(mine), len(mine) / wall, f"{100 * errors / len(mine):.1f}%",
                     statistics.median(latencies), p95, " ".join(f"{c}x{n}" for c, n in sorted(codes.items()))])
        if route != "all":
            unexpected += [f"{route} {status}: {body}" for _, status, _, body in mine
                           if status not in (200, 503) or (status == 503 and "maximum pending" not in body)]
    print_table(
        f"{args.clients} clients for {args.seconds:.0f}s (chat 16 tokens / embed 1 input / job status), "
        f"OLLAMA_MAX_QUEUE={args.max_queue}, one CPU worker",
        ["route", "requests", "req/s", "errors", "p50 ms", "p95 ms", "status codes"], rows,
    )
    print(f"\nunexpected errors: {len(unexpected)}")
    for line in unexpected[:10]:
        print("  " + line)


if __name__ == "__main__":
    main()
