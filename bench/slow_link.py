"""What a slow link between the API and its database host adds (issue #38): time to first token and a 64-item job.

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.slow_link [--delays 0,10,50] [--requests 20]

The deployment it stands for: the API on one host, Redis and PostgreSQL on another ("db"), the worker beside the
database.  This kernel has no ``netem``, so the API reaches both servers through harness/tcp_proxy.py, which holds
every byte for the given milliseconds in each direction (a round trip costs twice the one-way delay); the worker reaches
them directly.  PostgreSQL is a private server (harness/postgres.py) so the bench owns it; Redis is private too.

For each delay it prints:
- time to first token of a streaming ``/api/generate`` (p50 and p95 of ``--requests``, one at a time): the API
  pipelines its queue entry and reader lease, sends the Celery message, then reads the stream;
- a 64-item generate job's wall time from ``POST /api/jobs`` to the poll that sees it completed (polled every
  100 ms through the API, which reads SQL);
- one status poll (``GET /api/jobs/<id>``), p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import model_path, print_table
from corral.settings import Settings
from harness.postgres import PostgresServer
from harness.processes import free_port, redis_or_private
from harness.stack import Stack, fresh_database
from harness.tcp_proxy import TcpProxy

ITEMS = 64
PROMPT = "Why is the sky blue?"


@contextmanager
def deployment(home: Path) -> Iterator[tuple[Stack, TcpProxy, TcpProxy]]:
    """A worker on the database host, an API behind two delayable proxies (to Redis and to PostgreSQL)."""
    with redis_or_private(None, home / "redis") as redis_url, \
            PostgresServer(home / "pgdata", "127.0.0.1", free_port()) as pg:
        pg.create_database("bench")
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        with TcpProxy(("127.0.0.1", port)) as to_redis, TcpProxy(("127.0.0.1", pg.port)) as to_pg:
            common: dict[str, Any] = {"home": home, "models_dir": home / "models", "chunk_size": 8}
            direct = Settings(redis_url=redis_url, database_url=pg.url("bench"), host=f"127.0.0.1:{free_port()}",
                              **common)
            fresh_database(direct)
            slow = Settings(redis_url=f"redis://127.0.0.1:{to_redis.port}/0",
                            database_url=f"postgresql+psycopg://postgres@127.0.0.1:{to_pg.port}/bench",
                            host=f"127.0.0.1:{free_port()}", **common)
            worker, api = Stack(direct, home / "logs"), Stack(slow, home / "logs-api")
            try:
                worker.start_worker()
                api.start_api()
                yield api, to_redis, to_pg
            finally:
                api.stop()
                worker.stop()


def ttft(client: httpx.Client) -> float:
    body = {"model": "smollm2", "prompt": PROMPT, "options": {"temperature": 0, "num_predict": 4}}
    started = time.perf_counter()
    with client.stream("POST", "/api/generate", json=body) as r:
        for line in r.iter_lines():
            if json.loads(line).get("response"):
                return (time.perf_counter() - started) * 1000
    raise RuntimeError("no text in the reply")


def job_seconds(client: httpx.Client) -> tuple[float, float]:
    """(seconds from submit to completed, p50 ms of a status poll)."""
    items = [{"custom_id": f"q{i}", "prompt": f"Count to {i}."} for i in range(ITEMS)]
    started = time.perf_counter()
    r = client.post("/api/jobs", json={"kind": "generate", "model": "smollm2", "items": items,
                                       "options": {"temperature": 0, "num_predict": 8}})
    r.raise_for_status()
    job_id = r.json()["id"]
    polls = []
    while True:
        t = time.perf_counter()
        state = client.get(f"/api/jobs/{job_id}").json()
        polls.append((time.perf_counter() - t) * 1000)
        if state["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    if state["status"] != "completed" or state["counts"].get("succeeded") != ITEMS:
        raise RuntimeError(f"job ended {state}")
    return time.perf_counter() - started, statistics.median(polls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", default="0,10,50", help="one-way delays in ms, comma-separated")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="corral-slow-link-"))
    model_path(home, "smollm2:135m")
    rows = []
    with deployment(home) as (api, to_redis, to_pg), httpx.Client(base_url=api.base_url, timeout=120) as client:
        ttft(client)  # the model loads
        for delay in [float(d) for d in args.delays.split(",")]:
            to_redis.delay(delay, "both")
            to_pg.delay(delay, "both")
            times = sorted(ttft(client) for _ in range(args.requests))
            job, poll = job_seconds(client)
            rows.append([f"{delay:g} ms", f"{statistics.median(times):.1f}",
                         f"{times[int(0.95 * (len(times) - 1))]:.1f}", f"{job:.2f}", f"{poll:.1f}"])
    headers = ["one-way delay", "TTFT p50 ms", "TTFT p95 ms", f"{ITEMS}-item job s", "status poll p50 ms"]
    print_table(f"API <-> Redis and PostgreSQL delayed ({args.requests} requests per row)", headers, rows)


if __name__ == "__main__":
    main()
