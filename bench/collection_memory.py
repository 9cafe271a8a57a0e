"""The API's memory against a collection's size (issue #37 item 6: "the API's memory is flat in collection size").

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python bench/collection_memory.py [--sizes 10000,100000]
        [--searches 200] [--database-url postgresql+psycopg://...]

Why: a search must read a bounded part of a collection whatever its size (SQLite's sign-bit blocks are scanned
``PAGE`` blocks at a time, pgvector's HNSW walks its graph in the server), so the API process serving it should
hold the same memory for 10,000 chunks as for 100,000.  A leg that loaded a whole collection into the API, or a
cache keyed by collection that grew with it, would show here and in no latency table.

How: for each size, a fresh API and worker (``corral serve``, ``corral worker``, SQLite in a new home unless
``--database-url``), a store made through ``POST /v1/vector_stores`` with all-minilm, filled with that many chunks
of random unit vectors and Zipf-drawn words (bench/collection_search.py ``fill``, a document of 100 chunks per
transaction as the worker's apply writes them), then ``--searches`` hybrid searches through the API (each query
embedded on the worker), a tenth of them filtered.  Prints the API's resident memory (gunicorn's master and
workers together) after one warm-up search and after all of them, the highest seen between, and the search p50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.collection_search import DIMS, fill, vocabulary
from bench.collections_scale import api_rss_kib
from bench.common import corral_stack, model_path, print_table
from jobs.db import engine_for

# All resident memory, then its parts: the process's own (heap, stacks) and mapped files (SQLite's database,
# memory-mapped by jobs/db.py's pragma, among them: the kernel's page cache, shared and reclaimable)
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def random_unit(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def measure(size: int, searches: int, database_url: str | None) -> list[Any]:
    home = Path(tempfile.mkdtemp(prefix="corral-bench-memory-"))
    model_path(home, "all-minilm")
    extra = {"database_url": database_url} if database_url else {}
    with corral_stack(home, worker_args=("--models", "all-minilm"), keep_alive=-1, **extra) as stack, \
            httpx.Client(base_url=stack.base_url, timeout=300) as client:
        store = client.post("/v1/vector_stores", json={"name": f"memory-{size}", "model": "all-minilm"})
        store.raise_for_status()
        store_id = store.json()["id"]
        url = database_url or stack.settings.database
        seconds = fill(sessionmaker(engine_for(url), expire_on_commit=False), random_unit(size, 1), 120,
                       collection=store_id, digest=None)
        vocab = vocabulary()
        rng = np.random.default_rng(2)

        def search(n: int) -> float:
            body: dict[str, Any] = {"query": " ".join(rng.choice(vocab[50:2000], size=3)), "max_num_results": 10}
            if n % 10 == 0:
                body["filters"] = {"key": "half", "type": "eq", "value": True}
            started = time.perf_counter()
            reply = client.post(f"/v1/vector_stores/{store_id}/search", json=body)
            reply.raise_for_status()
            assert reply.json()["data"], reply.text
            return (time.perf_counter() - started) * 1000

        search(0)
        warm = {field: api_rss_kib(stack, field) for field in FIELDS}
        peak = [warm["VmRSS"]]
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.2):
                peak.append(api_rss_kib(stack))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        times = [search(n) for n in range(1, searches + 1)]
        stop.set()
        watcher.join()
        after = {field: api_rss_kib(stack, field) for field in FIELDS}
    return [f"{size:,}", f"{seconds:.0f}", *(f"{warm[f] / 1024:.1f} / {after[f] / 1024:.1f}" for f in FIELDS),
            max(peak) / 1024, statistics.median(times), f"{os.getloadavg()[0]:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="collection sizes in chunks, comma-separated")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--database-url", default=None, help="a PostgreSQL URL (emptied) instead of SQLite")
    args = parser.parse_args()
    rows = [measure(int(size), args.searches, args.database_url) for size in args.sizes.split(",")]
    print_table("The API's resident memory by collection size (gunicorn master and workers)",
                ["chunks", "fill s", *(f"{f} MiB, after 1 / {args.searches} searches" for f in FIELDS),
                 "highest VmRSS MiB", "search p50 ms", "load"], rows)


if __name__ == "__main__":
    main()
