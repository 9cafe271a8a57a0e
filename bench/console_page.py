"""How long the operator console takes to render a job of 100,000 items (issue #25: under 300 ms).

A 100,000-item generate job is written through the job service (as ``POST /api/jobs`` writes it), then its
items are given results in SQL as a worker would have, finished over ten minutes, 1% failed and a quarter
still pending (the job is running).  The pages are then rendered through the real app, in process, with its
real Redis and database: the job's page (counts, the throughput chart, failed items, the first results) and
the jobs list.  Nothing is sent to a worker; the job's chunk messages are purged at the end.

    .venv/bin/python bench/console_page.py [--items 100000] [--runs 20] [--database-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_database, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    args = parser.parse_args()

    from sqlalchemy import select, update

    from api import create_app
    from jobs.db import sessions
    from jobs.models import Item, ItemState, Job, JobStatus, utcnow

    with bench_database("corral-console-bench-", args.database_url) as settings:
        app = create_app(settings)
        shared = app.extensions["corral"]
        started = time.perf_counter()
        items = ((f"row-{n}", {"prompt": f"Summarise document {n}", "options": {"num_predict": 32}})
                 for n in range(args.items))
        job = shared.jobs.submit(kind="generate", model="smollm2:135m", items=items, chunk_size=1000)
        submitted = time.perf_counter() - started
        # As if a worker had run three quarters of it over ten minutes: results, tokens, finish times.
        begun = utcnow() - timedelta(minutes=10)
        done = args.items * 3 // 4
        with sessions(settings)() as session:
            session.execute(update(Job).where(Job.id == job["id"]).values(status=JobStatus.RUNNING, started_at=begun))
            step = 600 / max(done, 1)
            ids = list(session.scalars(select(Item.id).where(Item.job_id == job["id"]).order_by(Item.seq).limit(done)))
            for first in range(0, done, 5000):
                rows = []
                for n in range(first, min(first + 5000, done)):
                    failed = n % 100 == 99
                    rows.append({
                        "id": ids[n], "state": ItemState.FAILED if failed else ItemState.SUCCEEDED,
                        "error": "generation failed: out of memory" if failed else None,
                        "output": None if failed else {"model": "smollm2:135m", "response": f"Summary {n}.", "done": True,
                                                       "done_reason": "stop", "eval_count": 32, "prompt_eval_count": 12},
                        "prompt_tokens": 12, "completion_tokens": 32, "finished_at": begun + timedelta(seconds=n * step),
                    })
                session.execute(update(Item), rows)  # bulk UPDATE by primary key
                session.commit()
        client = app.test_client()
        rows = []
        for label, path in ((f"job page ({args.items:,} items)", f"/ui/jobs/{job['id']}"),
                            ("job page, live part only", f"/ui/jobs/{job['id']}?fragment=1"),
                            ("jobs list", "/ui/jobs")):
            client.get(path)  # warm: templates compiled, connections open
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                reply = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert reply.status_code == 200, reply.status_code
            times.sort()
            rows.append([label, statistics.median(times), times[int(len(times) * 0.95) - 1], times[-1]])
        database = "PostgreSQL" if args.database_url and args.database_url.startswith("postgres") else "SQLite"
        print(f"\nsubmitted {args.items:,} items in {submitted:.1f} s; {done:,} given results")
        print_table(f"Console render time, ms ({database}, {args.runs} runs, in-process Flask client)",
                    ["page", "p50", "p95", "max"], rows)
        shared.jobs.cancel(job["id"])  # its chunk messages leave the broker


if __name__ == "__main__":
    main()
