"""What the benchmarks share: a real corral stack in a temporary home, the default models, and the table."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.launcher import free_port, redis_reachable, start_private_redis, stop
from corral.catalog import ensure_defaults
from corral.settings import Settings
from corral.store import ModelStore


def model_path(home: Path, name: str) -> Path:
    """The GGUF of one of the default models, set up (linked or converted) in ``home``'s model store."""
    store = ModelStore(home / "models")
    ensure_defaults(store)
    return store.blob_path(store.get(name).model_digest)


@contextmanager
def corral_stack(home: Path, **settings: Any) -> Iterator[Any]:
    """A real API server and worker process (Redis from REDIS_URL or a private one; SQLite in ``home``)."""
    from jobs.db import upgrade
    from tests.helpers import Stack

    private, redis_url = bench_redis(home)
    values: dict[str, Any] = {
        "home": home, "redis_url": redis_url, "models_dir": home / "models",
        "host": f"127.0.0.1:{free_port()}", "database_url": f"sqlite:///{home / 'bench.db'}", **settings,
    }
    config = Settings(**values)
    upgrade(config)
    try:
        with Stack(config, home / "logs").running() as stack:
            yield stack
    finally:
        stop_bench_redis(private)


def bench_redis(home: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """(the private Redis started for this bench or None, its URL): REDIS_URL when it answers, else a private one
    (a bench that shares the test suite's Redis would share its queues: run benches without REDIS_URL)."""
    url = os.environ.get("REDIS_URL")
    if url and redis_reachable(url):
        return None, url
    return start_private_redis(home / "redis", persist=False)


def stop_bench_redis(private: subprocess.Popen[bytes] | None) -> None:
    if private is not None:
        stop(private, "redis", timeout=10)


@contextmanager
def bench_database(prefix: str, database_url: str | None = None) -> Iterator[Settings]:
    """Settings for a bench in a new temporary home: the chat model set up, Redis (:func:`bench_redis`), and a
    migrated database, SQLite in the home or ``database_url`` emptied first, with a free port for a server."""
    from jobs.db import engine_for, upgrade
    from tests.helpers import drop_everything

    home = Path(tempfile.mkdtemp(prefix=prefix))
    model_path(home, "smollm2:135m")
    private, redis_url = bench_redis(home)
    database = database_url or f"sqlite:///{home / 'bench.db'}"
    try:
        settings = Settings(home=home, redis_url=redis_url, models_dir=home / "models", database_url=database,
                            host=f"127.0.0.1:{free_port()}")
        if not database.startswith("sqlite"):
            drop_everything(engine_for(database))
        upgrade(settings)
        yield settings
    finally:
        stop_bench_redis(private)


def wait_for_job(client: Any, job_id: str, poll: float = 0.5) -> dict[str, Any]:
    """Poll a job until it ends, with one persistent client (a fresh httpx client per poll builds an SSL
    context each time: at 10 polls/s that took half a core from the worker on a 2-core machine)."""
    import time

    while True:
        state: dict[str, Any] = client.get(f"/api/jobs/{job_id}").json()
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        time.sleep(poll)


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table, as pasted into bench/README.md and the issue notes."""
    cells = [[h for h in headers]] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}\n")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
