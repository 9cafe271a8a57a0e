"""What the benchmarks share: a real corral stack in a temporary home, the default models, and the table."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.processes import free_port, redis_or_private
from harness.stack import Stack, fresh_database


def model_path(home: Path, name: str) -> Path:
    """The GGUF of one of the default models, set up (linked or converted) in ``home``'s model store."""
    store = ModelStore(home / "models")
    ensure_defaults(store)
    return store.blob_path(store.get(name).model_digest)


@contextmanager
def corral_stack(home: Path, worker_args: tuple[str, ...] = (), **settings: Any) -> Iterator[Any]:
    """A real API server and worker process (``corral worker`` with ``worker_args``; Redis from
    :func:`bench_redis`; SQLite in ``home``)."""
    from jobs.db import upgrade

    with bench_redis(home) as redis_url:
        values: dict[str, Any] = {
            "home": home, "redis_url": redis_url, "models_dir": home / "models",
            "host": f"127.0.0.1:{free_port()}", "database_url": f"sqlite:///{home / 'bench.db'}", **settings,
        }
        config = Settings(**values)
        upgrade(config)
        with Stack(config, home / "logs").running(*worker_args) as stack:
            yield stack


def bench_redis(home: Path) -> AbstractContextManager[str]:
    """The URL of REDIS_URL's Redis when it answers, else of a private one in ``home`` for the bench's length
    (a bench that shares the test suite's Redis would share its queues: run benches without REDIS_URL)."""
    return redis_or_private(os.environ.get("REDIS_URL"), home / "redis")


@contextmanager
def bench_database(prefix: str, database_url: str | None = None) -> Iterator[Settings]:
    """Settings for a bench in a new temporary home: the chat model set up, Redis (:func:`bench_redis`), and a
    migrated database, SQLite in the home or ``database_url`` emptied first, with a free port for a server."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    model_path(home, "smollm2:135m")
    database = database_url or f"sqlite:///{home / 'bench.db'}"
    with bench_redis(home) as redis_url:
        settings = Settings(home=home, redis_url=redis_url, models_dir=home / "models", database_url=database,
                            host=f"127.0.0.1:{free_port()}")
        fresh_database(settings)
        yield settings


def wait_for_job(client: Any, job_id: str, poll: float = 0.5) -> dict[str, Any]:
    """Poll a job until it ends, with one persistent client (a fresh httpx client per poll builds an SSL
    context each time: at 10 polls/s that took half a core from the worker on a 2-core machine)."""
    import time

    while True:
        state: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        time.sleep(poll)


def run_generate_job(client: Any, texts: list[str], tokens: int, poll: float = 0.5) -> tuple[float, list[dict[str, Any]]]:
    """One greedy ``generate`` job of raw ``texts`` with ``tokens`` new tokens each: (seconds from submission to
    its end, its result lines); every item must succeed."""
    import json
    import time

    body = {"model": "smollm2", "kind": "generate", "options": {"temperature": 0, "num_predict": tokens},
            "items": [{"custom_id": str(i), "prompt": t, "raw": True} for i, t in enumerate(texts)]}
    started = time.perf_counter()
    job = client.post("/api/jobs", json=body).json()
    state = wait_for_job(client, job["id"], poll=poll)
    elapsed = time.perf_counter() - started
    assert state["counts"]["succeeded"] == len(texts), state
    return elapsed, [json.loads(line) for line in client.get(f"/api/jobs/{job['id']}/results").text.splitlines()]


def time_embed_job(client: Any, texts: list[str], chunk_size: int, model: str = "all-minilm") -> float:
    """Chunks/s of one embed job of ``texts``, timed from its JSONL upload to its end (every item succeeded)."""
    import json
    import time

    body = "".join(json.dumps({"input": t}) + "\n" for t in texts).encode()
    started = time.perf_counter()
    job = client.post("/api/jobs", params={"kind": "embed", "model": model, "chunk_size": chunk_size},
                      content=body, headers={"Content-Type": "application/x-ndjson"}).json()
    state = wait_for_job(client, job["id"], poll=0.25)
    elapsed = time.perf_counter() - started
    assert state["counts"]["succeeded"] == len(texts), state
    return len(texts) / elapsed


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table, as pasted into bench/README.md and the issue notes."""
    cells = [[h for h in headers]] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
