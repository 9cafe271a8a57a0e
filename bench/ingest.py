"""A million-line job through ``corral submit`` (issue #24, "scale, measured"), on SQLite and PostgreSQL.

    .venv/bin/python bench/ingest.py [--lines 1000000] [--small 100000] [--database-url postgresql+psycopg://...]
                                     [--stops-only]

For each size (``--small`` and ``--lines``) a generated JSONL file is uploaded with ``corral submit`` to a real
API server process (``corral serve``; no worker, so nothing runs and the numbers are the API's alone).  The
table gives the upload's wall time, the API's peak RSS during it (all its processes), a status poll of the job
(``GET /api/jobs/{id}``, median of 20), the CLI's peak RSS exporting the job's results as CSV, and how long
cancelling the job takes, how long the reconciler's settling of its items takes (its background rewrite of the
pending rows as cancelled, in its batches; the longest batch is how long it holds the database at once), and how
long deleting the job takes.  Then 10,000
small jobs are stored and ``GET /api/jobs`` is timed.  Goals: upload under 30 s; peak RSS at ``--lines``
within 20% of that at ``--small``; a status poll under 50 ms; ``GET /api/jobs`` fast with 10,000 jobs; a cancel
under 2 s at a million items (issue #38: a cancel changes the job and its chunks, not its items).

``--stops-only`` skips the CSV export and the 10,000-job listing (minutes at a million items on a busy machine)
when only the cancel and delete times are wanted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_database, print_table
from harness.stack import Stack


def write_job(path: Path, lines: int) -> None:
    with open(path, "w") as out:
        for n in range(lines):
            out.write(json.dumps({"custom_id": f"doc-{n}", "prompt": f"Summarise document {n} in one line.",
                                  "options": {"num_predict": 16}}) + "\n")


class PeakRss:
    """The largest total RSS of a process and its children, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed_get(client: httpx.Client, path: str, runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        assert client.get(path).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def settle_items(settings: Any, job_id: str) -> tuple[float, float]:
    """The reconciler's settling of a stopped job's items, run to the end here (a worker spreads it over its
    sweeps, at most a second each): (seconds in all, seconds of the longest batch)."""
    from jobs import transitions
    from jobs.db import sessions
    from jobs.reconcile import SETTLE_BATCH

    total = longest = 0.0
    with sessions(settings)() as session:
        while True:
            started = time.perf_counter()
            n = transitions.settle_batch(session, job_id, SETTLE_BATCH)
            session.commit()
            took = time.perf_counter() - started
            total, longest = total + took, max(longest, took)
            if n < SETTLE_BATCH:
                return total, longest


def store_jobs(settings: Any, count: int) -> None:
    """``count`` small jobs (two items each) written straight to SQL, as many submissions would leave them."""
    from sqlalchemy import insert

    from jobs.db import sessions
    from jobs.models import Item, Job, JobStatus, utcnow

    with sessions(settings)() as session:
        for start in range(0, count, 1000):
            jobs = [{"id": f"job_bench{n:019d}", "kind": "generate", "model": "smollm2:135m", "model_digest": "0" * 64,
                     "options": {}, "status": JobStatus.COMPLETED, "item_count": 2, "chunk_size": 16, "meta": {},
                     "created_at": utcnow(), "finished_at": utcnow(), "started_at": utcnow()}
                    for n in range(start, min(start + 1000, count))]
            session.execute(insert(Job), jobs)
            session.execute(insert(Item), [{"job_id": j["id"], "seq": s, "input": {"prompt": "x"}, "state": "succeeded",
                                            "attempts": 1, "prompt_tokens": 5, "completion_tokens": 5}
                                           for j in jobs for s in range(2)])
        session.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    parser.add_argument("--stops-only", action="store_true", help="skip the CSV export and the 10,000-job listing")
    args = parser.parse_args()

    with bench_database("corral-ingest-bench-", args.database_url) as settings:
        home, database = settings.home, settings.database
        stack = Stack(settings, home / "logs")
        rows = []
        try:
            api = stack.start_api()
            env = {**os.environ, "CORRAL_HOST": stack.base_url}
            with httpx.Client(base_url=stack.base_url, timeout=120) as client:
                for lines in (args.small, args.lines):
                    source = home / f"job-{lines}.jsonl"
                    write_job(source, lines)
                    with PeakRss(api.proc.pid) as api_rss:
                        started = time.perf_counter()
                        out = subprocess.run([sys.executable, "-m", "cli", "submit", str(source), "-m", "smollm2:135m",
                                              "--json"], env=env, capture_output=True, text=True)
                        if out.returncode != 0:
                            raise SystemExit(f"corral submit failed: {out.stderr}")
                        upload = time.perf_counter() - started
                    job_id = json.loads(out.stdout)["id"]
                    poll = timed_get(client, f"/api/jobs/{job_id}")
                    export_peak = float("nan")
                    if not args.stops_only:
                        export = subprocess.Popen([sys.executable, "-m", "cli", "results", job_id, "--format", "csv",
                                                   "-o", str(home / f"out-{lines}.csv")], env=env)
                        with PeakRss(export.pid) as export_rss:
                            export.wait()
                        export_peak = export_rss.peak / 2**20
                    started = time.perf_counter()
                    assert client.post(f"/api/jobs/{job_id}/cancel", timeout=600).status_code == 200
                    cancel = time.perf_counter() - started  # the job and its chunks change; its items read as cancelled
                    counts = client.get(f"/api/jobs/{job_id}").json()["counts"]
                    assert counts["cancelled"] == lines and counts["pending"] == 0, counts
                    settle, longest = settle_items(settings, job_id)
                    assert client.get(f"/api/jobs/{job_id}").json()["counts"] == counts  # read the same after
                    started = time.perf_counter()
                    assert client.delete(f"/api/jobs/{job_id}", timeout=600).status_code == 200
                    delete = time.perf_counter() - started
                    rows.append([f"{lines:,} lines", upload, api_rss.peak / 2**20, poll, export_peak, cancel, settle,
                                 longest * 1000, delete])
                if not args.stops_only:
                    store_jobs(settings, 10_000)
                    listing = timed_get(client, "/api/jobs?limit=20")
                    first_page_status = timed_get(client, "/api/jobs?status=completed&limit=20")
        finally:
            stack.stop()
    name = "PostgreSQL" if database.startswith("postgres") else "SQLite"
    print_table(f"corral submit of a generated JSONL job, {name}, API with no worker",
                ["job", "upload s", "API peak RSS MiB", "status poll ms", "CSV export peak RSS MiB", "cancel s",
                 "settle s", "longest settle batch ms", "delete s"], rows)
    print(f"\nAPI RSS at {args.lines:,} / at {args.small:,}: {rows[1][2] / rows[0][2]:.2f}x")
    if not args.stops_only:
        print(f"GET /api/jobs?limit=20 with {10_000 + 2:,} jobs stored: {listing:.1f} ms; ?status=completed: "
              f"{first_page_status:.1f} ms (median of 20)")


if __name__ == "__main__":
    main()
