"""The chaos soak's audit (bench/chaos.py): per submitted item, what SQL and the results route say became of it.

Why from SQL and the trigger, not the API's counts: a count can be right while an item is missing and another
listed twice, and a result written twice leaves one row that looks fine.  So for every custom id the load sent
(bench/chaos_ledger.py) the audit reads its rows, its state and result, how many result writes the trigger logged
for it (bench/chaos_cluster.py, ``chaos_result_writes``) and how many times the job's results route lists it:

- ``lost``: no row, or not ended, or succeeded with no result, or ended but not in the results;
- ``duplicated``: two rows, or two result writes, or listed twice, or a row the bench never sent;
- ``re-run``: tried more than once (a chunk taken over) with one result still: the design, counted to show the
  faults did bite.

Jobs in SQL the ledger does not know of are listed too: a submission the API made but answered with an error.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select, text

from bench.chaos_cluster import ChaosCluster
from bench.chaos_ledger import Ledger


@dataclass
class Audit:
    """What the audit found: counts per job kind (``jobs``, ``submitted``, ``succeeded``, ``failed``, ``lost``,
    ``duplicated``, ``re-run``, ``job <status>``), failed items by error, and each lost or duplicated item."""

    by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failed_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unacknowledged: list[str] = field(default_factory=list)


def audit(cluster: ChaosCluster, ledger: Ledger) -> Audit:
    """Per submitted item: its rows, its state, its result, its result writes (SQL), and the results route's
    lines."""
    from jobs.db import sessions
    from jobs.models import Job

    found = Audit()
    known = {job.job_id for job in ledger.jobs}
    with sessions(cluster.settings)() as session:
        writes: Counter[int] = Counter(dict(session.execute(text(
            "SELECT item_id, count(*) FROM chaos_result_writes GROUP BY item_id")).all()))
        for job in ledger.jobs:
            counts = found.by_kind[job.kind]
            counts["jobs"] += 1
            counts["submitted"] += len(job.custom_ids)
            status = session.scalar(select(Job.status).where(Job.id == job.job_id))
            counts[f"job {status}"] += 1
            rows = session.execute(text(
                "SELECT id, custom_id, state, (output IS NOT NULL AND output::text <> 'null') AS out,"
                " embedding IS NOT NULL AS emb, error, attempts FROM job_items WHERE job_id = :job"),
                {"job": job.job_id}).all()
            by_custom: dict[str | None, list[Any]] = defaultdict(list)
            for row in rows:
                by_custom[row.custom_id].append(row)
            lines = result_lines(cluster, job.job_id)
            for custom_id in job.custom_ids:
                mine = by_custom.pop(custom_id, [])
                where = f"{job.kind} {job.job_id} {custom_id}"
                if not mine:
                    counts["lost"] += 1
                    found.lost.append(f"{where}: no row")
                    continue
                row = mine[0]
                written = sum(writes.get(r.id, 0) for r in mine)
                listed = lines.get(custom_id, 0) if lines is not None else 1
                if len(mine) > 1 or written > 1 or listed > 1:
                    counts["duplicated"] += 1
                    found.duplicated.append(f"{where}: {len(mine)} row(s), {written} result write(s), listed {listed}x")
                if row.attempts > 1:
                    counts["re-run"] += 1
                if row.state == "succeeded" and (row.out or row.emb):
                    counts["succeeded"] += 1
                elif row.state == "failed":
                    counts["failed"] += 1
                    found.failed_errors[(job.kind, str(row.error or "")[:140])] += 1
                else:
                    counts["lost"] += 1
                    found.lost.append(f"{where}: {row.state}, result {'yes' if row.out or row.emb else 'none'}")
                if lines is not None and listed == 0 and row.state in ("succeeded", "failed"):
                    counts["lost"] += 1
                    found.lost.append(f"{where}: ended {row.state} but not in the results")
            for stray, extra in by_custom.items():
                found.duplicated.append(f"{job.kind} {job.job_id} {stray}: {len(extra)} row(s) never submitted")
                counts["duplicated"] += len(extra)
        others = session.execute(select(Job.id, Job.kind, Job.status, Job.item_count)).all()
    found.unacknowledged = [f"{row.id} ({row.kind}, {row.status}, {row.item_count} items)" for row in others
                            if row.id not in known]
    return found


def result_lines(cluster: ChaosCluster, job_id: str) -> Counter[str] | None:
    """custom_id -> how many times the job's results route lists it (None when the route cannot be read)."""
    try:
        r = httpx.get(f"{cluster.api_url}/api/jobs/{job_id}/results", timeout=60)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return Counter(str(json.loads(line).get("custom_id")) for line in r.text.splitlines() if line.strip())
