"""What the chaos soak's logs say (bench/chaos.py): the processes' errors and PostgreSQL's, counted by message.

Why: every fault leaves errors behind by design (a worker's claim that met a PostgreSQL restart, the sessions a
stop ended), and a count of tracebacks alone cannot tell those from a defect.  Grouped by the line that logged
them, with the numbers and ids in it blanked, a reader sees at once which ones repeat, where, and how often, and
can look up the rest in the kept logs (``logs/<host>/``; PostgreSQL's log is copied to ``logs/db/`` before the
server's own directory is removed).
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections import Counter
from pathlib import Path

from bench.chaos_cluster import ChaosCluster

# "2026-12-03 10:59:18,737 ERROR jobs.webhooks: cannot claim ..." (corral's processes, harness.stack's logs)
_PROCESS_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) (\S+?): (.*)$")
# "<time> <client> <application> [<pid>] FATAL:  ..." (harness.cluster's log_line_prefix)
_POSTGRES_LINE = re.compile(r"\b(PANIC|FATAL|ERROR):\s+(.*)$")
_VARYING = re.compile(r"\b[\w-]*\d[\w.:-]*\b")  # numbers, ids, addresses, durations
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def keep_postgres_log(cluster: ChaosCluster, root: Path) -> None:
    """Copy PostgreSQL's log beside the processes' logs: the server's own directory goes with the cluster."""
    with contextlib.suppress(OSError):
        (root / "logs" / "db").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cluster.postgres.log, root / "logs" / "db" / "postgresql.log")


def shape(message: str, width: int = 90) -> str:
    """A message with what varies between its repeats blanked (``#``), cut to ``width``."""
    return _VARYING.sub("#", message.strip())[:width]


def tracebacks(root: Path) -> str:
    """The processes' logs that hold a traceback, and how many (a chained one counts once)."""
    found = []
    for path in sorted((root / "logs").glob("*/*.log")):
        lines = path.read_text(errors="replace").splitlines()
        n = sum(1 for i, line in enumerate(lines) if line.startswith("Traceback")
                and not any(lines[j].startswith(_CHAINED) for j in range(max(0, i - 2), i)))
        if n:
            found.append(f"{path.parent.name}/{path.name} {n}")
    return ", ".join(found) or "none"


def errors(root: Path) -> Counter[tuple[str, str]]:
    """(log, level and message shape) -> count: every ERROR or CRITICAL line of the processes' logs and every
    PANIC, FATAL or ERROR of PostgreSQL's."""
    found: Counter[tuple[str, str]] = Counter()
    for path in sorted((root / "logs").glob("*/*.log")):
        name = f"{path.parent.name}/{path.name}"
        postgres = path.name == "postgresql.log"
        for line in path.read_text(errors="replace").splitlines():
            if postgres:
                match = _POSTGRES_LINE.search(line)
                if match:
                    found[(name, f"{match.group(1)} {shape(match.group(2))}")] += 1
                continue
            match = _PROCESS_LINE.match(line)
            if match:
                found[(name, f"{match.group(1)} {match.group(2)}: {shape(match.group(3))}")] += 1
    return found
