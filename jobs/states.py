"""The state names of jobs, items and chunks: a module of their own, without SQLAlchemy, so that the CLI
(``corral status`` and the like) can name them without importing the database layer (a fifth of a second at
every start)."""

from __future__ import annotations


class JobStatus:
    """``jobs.status``.  Only :mod:`jobs.transitions` moves a job from one to another."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    ALL = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, EXPIRED)
    ACTIVE = (QUEUED, RUNNING)
    TERMINAL = (COMPLETED, FAILED, CANCELLED, EXPIRED)
    # A job that stopped early: its pending items were cancelled, a running one stops between tokens.
    STOPPED = (CANCELLED, FAILED, EXPIRED)


class ItemState:
    """``job_items.state``: pending -> running (claimed) -> succeeded | failed | cancelled."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALL = (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
    OPEN = (PENDING, RUNNING)
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)


class ChunkState:
    """``job_chunks.state``: queued (held in SQL, or released: a message is on its way) -> running (claimed by a
    worker) -> done."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ALL = (QUEUED, RUNNING, DONE)
