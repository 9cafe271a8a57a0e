"""The chaos soak's process watch (bench/chaos.py): every process's memory and open descriptors over the soak,
and PostgreSQL's memory split so that its growth can be judged.

Why a split: RSS counts a shared page once per process that maps it, and PSS shares it out, but neither says what
kind of memory grew.  PostgreSQL's backends all map one shared segment (``shared_buffers`` and the server's other
shared structures, ``shared_memory_size`` in all): as the backends touch more buffers, the segment's resident
part grows until the whole of it is in memory, and then stops; that is a cache, bounded by the setting.  A leak
shows instead in the backends' private (anonymous) memory, or in a count of backends that only climbs.  So each
sample reads ``/proc/<pid>/smaps_rollup`` for each process and keeps its proportional parts: ``Pss_Anon``
(private heap, the stack, copy-on-write pages; proportional, so the pages a backend still shares with the
postmaster it forked from count once), ``Pss_Shmem`` (shared memory: summed over every PostgreSQL process, the
resident part of the shared segment, since only they map it) and ``Pss_File`` (the binaries and libraries).

- Every process (the API, both workers, each Redis server and Sentinel, PostgreSQL's postmaster and all its
  processes together) is sampled every 20 s; the report gives each one's RSS, PSS, anonymous memory and
  descriptors at the start (after the warm-up) and the end, and the anonymous memory every 5 minutes.
- PostgreSQL is also sampled once a minute into a series: its client backends (by ``application_name``, which is
  the client's host, from ``pg_stat_activity``) and other processes, anonymous memory in all and the largest
  backend's, shared memory, files, PSS, RSS, the database's size; and the server's ``shared_buffers`` and
  ``shared_memory_size``, so a reader sees whether the shared part levels off under the setting (or follows the
  data while the data is smaller) and whether the private part follows the backends.  A restart of the server
  (the ``postgres-restart`` fault) starts a new segment, empty: the series marks each new postmaster.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from bench.chaos_cluster import GPUS, ChaosCluster

SAMPLE_EVERY = 20.0  # seconds between samples of every process
SERIES_EVERY = 60.0  # seconds between rows of PostgreSQL's memory series
ROLLUP = ("Rss", "Pss", "Pss_Anon", "Pss_Shmem", "Pss_File")
POSTGRES = "db: postgres (all processes)"


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (one pass over /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def rollup(pid: int) -> dict[str, float] | None:
    """The process's :data:`ROLLUP` fields of ``/proc/<pid>/smaps_rollup`` in MiB (a missing field 0), or None
    when it is gone or a zombie."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    found = dict.fromkeys(ROLLUP, 0.0)
    for line in lines:
        key, _, rest = line.partition(":")
        if key in found:
            try:
                found[key] = float(rest.split()[0]) / 1024
            except (IndexError, ValueError):
                continue
    return found if found["Rss"] else None


def load_average() -> float:
    """The machine's 1-minute load average."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def is_client_backend(pid: int) -> bool:
    """Whether a PostgreSQL process serves a client: its title names the client's address, ``host(port)`` or
    ``[local]`` (the checkpointer, writers and launchers name none)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "(" in title or "[local]" in title


@dataclass
class Sample:
    """One role's processes at one moment (MiB; ``anon_max``: the largest single process's anonymous memory)."""

    pid: int
    at: float
    procs: int = 0
    fds: int = 0
    rss: float = 0.0
    pss: float = 0.0
    anon: float = 0.0
    shmem: float = 0.0
    file: float = 0.0
    anon_max: float = 0.0
    clients: int = 0


def measure(pids: list[int], at: float, count_clients: bool = False) -> Sample | None:
    """A :class:`Sample` summed over those of ``pids`` still alive (None when none is), under ``pids[0]``."""
    sample = Sample(pids[0], at)
    for pid in pids:
        memory = rollup(pid)
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        if memory is None:
            continue
        sample.procs += 1
        sample.fds += fds
        sample.rss += memory["Rss"]
        sample.pss += memory["Pss"]
        sample.anon += memory["Pss_Anon"]
        sample.shmem += memory["Pss_Shmem"]
        sample.file += memory["Pss_File"]
        sample.anon_max = max(sample.anon_max, memory["Pss_Anon"])
        if count_clients and is_client_backend(pid):
            sample.clients += 1
    return sample if sample.procs else None


@dataclass
class SeriesRow:
    """A row of PostgreSQL's memory series: the sample of all its processes, and its sessions by host."""

    sample: Sample
    by_host: str
    database_mb: float | None  # the database's size on disk (pg_database_size): what the buffers can cache
    load: float  # the machine's 1-minute load average then


@dataclass
class Watch:
    """Each process's samples, by role, per incarnation (pid); and PostgreSQL's series."""

    cluster: ChaosCluster
    samples: dict[str, dict[int, list[Sample]]] = field(default_factory=lambda: defaultdict(dict))
    marks: dict[str, dict[str, Sample]] = field(default_factory=lambda: defaultdict(dict))
    series: list[SeriesRow] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)  # the 1-minute load average at each sample
    started: float = field(default_factory=time.monotonic)

    def roles(self) -> dict[str, list[int]]:
        """role -> the pids it stands for now (a tree: the process and its children, where it has any)."""
        found: dict[str, list[int]] = {}
        api = self.cluster.stacks.get("api-a")
        if api and api.procs and api.procs[0].proc.poll() is None:
            found["api-a: corral serve"] = [api.procs[0].proc.pid, *children(api.procs[0].proc.pid)]
        for host in GPUS:
            worker = self.cluster.workers.get(host)
            if worker and worker.proc.proc.poll() is None:
                found[f"{host}: corral worker"] = [worker.proc.proc.pid, *children(worker.proc.proc.pid)]
        for node in [*self.cluster.redis.servers, *self.cluster.redis.sentinels]:
            pid = node.pid()
            if pid is not None:
                found[f"db: {node.name}"] = [pid]
        postmaster = self.cluster.postgres.pid()
        if postmaster is not None:
            found["db: postgres (postmaster)"] = [postmaster]
            found[POSTGRES] = [postmaster, *children(postmaster)]
        return found

    def sample(self, mark: str | None = None) -> None:
        """Every role's sample now (the start and end ones kept under ``mark``); a series row when one is due."""
        now = time.monotonic()
        if mark == "start":
            self.started = now
        self.loads.append(load_average())
        for role, pids in self.roles().items():
            # the postgres rows stand for a set whose members come and go: one incarnation, the postmaster's
            got = measure(pids, now, count_clients=role == POSTGRES)
            if got is None:
                continue
            self.samples[role].setdefault(pids[0], []).append(got)
            if mark:
                self.marks[mark][role] = got
            if role == POSTGRES and (mark or not self.series or now - self.series[-1].sample.at >= SERIES_EVERY - 1):
                self.series.append(SeriesRow(got, *self._from_sql(), self.loads[-1]))

    def read_settings(self) -> None:
        """The server's memory settings (``shared_memory_size``: PostgreSQL 15 and later)."""
        from jobs.db import sessions

        for name in ("shared_buffers", "shared_memory_size", "work_mem", "max_connections", "server_version"):
            try:
                with sessions(self.cluster.settings)() as session:
                    self.settings[name] = str(session.scalar(text(f"SHOW {name}")))
            except Exception as exc:  # an older server, or down: say which
                self.settings[name] = f"unknown ({type(exc).__name__})"

    def _from_sql(self) -> tuple[str, float | None]:
        """``pg_stat_activity``'s client backends by ``application_name`` (the client's host), or why not; and
        the database's size in MiB."""
        from jobs.db import sessions

        try:
            with sessions(self.cluster.settings)() as session:
                rows = session.execute(text(
                    "SELECT coalesce(nullif(application_name, ''), '?') AS app, count(*) AS n FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' GROUP BY 1 ORDER BY 1")).all()
                size = session.scalar(text("SELECT pg_database_size(current_database())"))
        except Exception as exc:  # down (a restart), or its host cut
            return f"({type(exc).__name__})", None
        return ", ".join(f"{row.app} {row.n}" for row in rows), float(size) / 2**20

    # -- what the report prints --------------------------------------------------------------------------------

    def load_summary(self) -> str:
        """The machine's 1-minute load average over the samples: mean / max (the soak shares its cores)."""
        if not self.loads:
            return "not sampled"
        return f"{sum(self.loads) / len(self.loads):.2f} / {max(self.loads):.2f}"

    def rows(self) -> list[list[Any]]:
        """Per role: pids, RSS, PSS, anonymous memory and descriptors at the start and the end (and peaks)."""
        rows = []
        for role in sorted(self.samples):
            incarnations = self.samples[role]
            first = self.marks["start"].get(role) or next(iter(incarnations.values()))[0]
            last = self.marks["end"].get(role)
            every = [s for run in incarnations.values() for s in run]
            restarted = len(incarnations) - 1
            name = role + (f" (restarted {restarted}x; last up {(last.at - incarnations[last.pid][0].at) / 60:.0f} min)"
                           if restarted and last else "")

            rows.append([
                name, f"{first.pid}" + (f" -> {last.pid}" if last and last.pid != first.pid else ""),
                f"{first.rss:.0f}", f"{last.rss:.0f}" if last else "gone", f"{max(s.rss for s in every):.0f}",
                f"{first.pss:.0f}", f"{last.pss:.0f}" if last else "gone",
                f"{first.anon:.0f}", f"{last.anon:.0f}" if last else "gone", f"{max(s.anon for s in every):.0f}",
                first.fds, last.fds if last else "gone", max(s.fds for s in every),
                f"{first.procs} / {last.procs}" if last else first.procs,
            ])
        return rows

    def series_rows(self) -> list[list[Any]]:
        """PostgreSQL's series, a row a minute; a new postmaster (a restart) marked in its first row."""
        rows = []
        previous = None
        for row in self.series:
            s = row.sample
            rows.append([
                f"{(s.at - self.started) / 60:.1f}", f"{s.pid}" + (" (new)" if previous not in (None, s.pid) else ""),
                s.clients, s.procs - 1 - s.clients, row.by_host.replace("|", "/"), f"{s.anon:.1f}",
                f"{s.anon_max:.1f}", f"{s.shmem:.1f}", f"{s.file:.1f}", f"{s.pss:.1f}", f"{s.rss:.0f}", s.fds,
                f"{row.database_mb:.0f}" if row.database_mb is not None else "-", f"{row.load:.1f}",
            ])
            previous = s.pid
        return rows

    def anon_over_time(self, every: float = 300.0) -> tuple[list[str], list[list[Any]]]:
        """Each role's anonymous memory (MiB) at every ``every`` seconds from the start: the sample nearest each
        mark, from whichever incarnation was up."""
        end = max((s.at for runs in self.samples.values() for run in runs.values() for s in run), default=self.started)
        marks = [self.started + k * every for k in range(int((end - self.started) // every) + 1)]
        if end - marks[-1] > every / 4:
            marks.append(end)
        rows = []
        for role in sorted(self.samples):
            every_sample = [s for run in self.samples[role].values() for s in run if s.at >= self.started - 1]
            cells: list[Any] = [role]
            for mark in marks:
                near = nearest(every_sample, mark)
                cells.append(f"{near.anon:.0f}" if near else "-")
            rows.append(cells)
        return [f"{(m - self.started) / 60:.0f} min" for m in marks], rows


def nearest(samples: list[Sample], at: float) -> Sample | None:
    """The sample taken nearest ``at``, if one was taken within a sampling interval and a half of it."""
    best = min(samples, key=lambda s: abs(s.at - at), default=None)
    return best if best is not None and abs(best.at - at) <= SAMPLE_EVERY * 1.5 else None
