"""The chaos soak's ledger (bench/chaos.py): what the load sent, what came of each interactive request, and which
fault struck when.

Why one shared record: the audit (bench/chaos_audit.py) checks exactly the jobs the load was told were made, and
every failed request is reported with the fault that was active around it, so a failure can be attributed (a
designed 503 during a Redis failover or a PostgreSQL restart) or stand out as one no fault explains.  The load's
threads and the fault loop write to it under its lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

RECENT = 15.0  # a request ending this long after a fault's end counts as "during" it


@dataclass
class Submitted:
    """A job the API acknowledged (202, or a batch object), and the custom ids the bench sent in it."""

    kind: str  # generate, embed, batch
    job_id: str
    custom_ids: list[str]
    at: float


@dataclass
class Interactive:
    """One chat: its timing (monotonic seconds), "ok" or why it failed, and the fault around it."""

    stream: bool
    started: float
    ended: float
    outcome: str  # "ok", or why it failed
    fault: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class FaultEvent:
    """One fault: where, from when to when (monotonic), how long it was held, and what its undoing found."""

    name: str
    host: str
    started: float
    ended: float = 0.0
    hold: float = 0.0
    note: str = ""


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: list[Submitted] = field(default_factory=list)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind: reason, fault around) -> count
    chats: list[Interactive] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fault_around(self, started: float, ended: float) -> str:
        """The first fault active while a request ran (or undone less than :data:`RECENT` s before it started),
        with its host; "none" when there was none."""
        with self.lock:
            hit = [f for f in self.faults if f.started <= ended and started <= (f.ended or ended) + RECENT]
        return f"{hit[0].name} {hit[0].host}" if hit else "none"

    def problem(self, text: str) -> None:
        """Something the report must show (a worker that had exited, a fault that could not be undone)."""
        with self.lock:
            self.problems.append(text)
