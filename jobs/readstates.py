"""How an item's state reads: the one rule every reader of ``job_items.state`` goes through.

Stopping a job (a cancel, an expiry: :func:`jobs.transitions.stop_job`) changes the job's row and its chunks',
not its items'.  Writing every pending item of a million-item job (``cancelled`` and its finish time, a new entry
in each of the table's five indexes) took 31.9 s on PostgreSQL, past most clients' timeouts (issue #38).  So an
item left ``pending`` under a stopped job (cancelled, expired, or failed whole) *is* cancelled: no worker may
claim it (the claim in :mod:`jobs.transitions` refuses it in SQL), and it reads as cancelled everywhere, in a
job's counts, its result lines, an OpenAI batch's error file, the metrics, the queued-items quota and the usage
report.  The reconciler later rewrites those rows in bounded batches (:func:`jobs.transitions.settle_batch`,
finish time: the job's), so the database converges; every reader is right before and after, because it reads
through here.

Two forms of the rule: for a reader that has the job in hand (its status known), plain Python over stored states
(:func:`reads_as`, :func:`stored_states`, :func:`fold_counts`); for a query across jobs, SQL expressions over
``job_items`` joined to ``jobs`` (:func:`state_in`, :func:`finished_at`, :func:`counts_by_state`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, false, func, or_, select
from sqlalchemy.orm import Session

from jobs.models import Item, ItemState, Job, JobStatus


def reads_as(state: str, job_status: str) -> str:
    """The state an item stored as ``state`` reads as, under a job of ``job_status``."""
    if state == ItemState.PENDING and job_status in JobStatus.STOPPED:
        return ItemState.CANCELLED
    return state


def stored_states(states: Iterable[str], job_status: str) -> tuple[str, ...]:
    """The stored states of the items that read as one of ``states`` under a job of ``job_status`` (to filter a
    query of one job's items by state): under a stopped job ``cancelled`` takes ``pending`` in, and ``pending``
    matches nothing."""
    wanted = set(states)
    if job_status not in JobStatus.STOPPED:
        return tuple(s for s in ItemState.ALL if s in wanted)
    stored = {s for s in wanted if s != ItemState.PENDING}
    if ItemState.CANCELLED in wanted:
        stored.add(ItemState.PENDING)
    return tuple(s for s in ItemState.ALL if s in stored)


def fold_counts(counts: dict[str, int], job_status: str) -> dict[str, int]:
    """One job's items per stored state -> per state as read (every state a key)."""
    folded = {state: int(counts.get(state, 0)) for state in ItemState.ALL}
    if job_status in JobStatus.STOPPED:
        folded[ItemState.CANCELLED] += folded[ItemState.PENDING]
        folded[ItemState.PENDING] = 0
    return folded


def settled_pending() -> ColumnElement[bool]:
    """An item stored ``pending`` under a stopped job (it reads as cancelled); the query joins ``jobs``."""
    return and_(Item.state == ItemState.PENDING, Job.status.in_(JobStatus.STOPPED))


def state_in(states: Iterable[str]) -> ColumnElement[bool]:
    """SQL: the item reads as one of ``states``; the query joins ``jobs`` on the item's job."""
    wanted = set(states)
    terms: list[ColumnElement[bool]] = []
    plain = [s for s in ItemState.ALL if s in wanted and s != ItemState.PENDING]
    if plain:
        terms.append(Item.state.in_(plain))
    if ItemState.PENDING in wanted:
        terms.append(and_(Item.state == ItemState.PENDING, Job.status.not_in(JobStatus.STOPPED)))
    elif ItemState.CANCELLED in wanted:
        terms.append(settled_pending())
    return or_(*terms) if terms else false()


def finished_at() -> ColumnElement[datetime | None]:
    """SQL: when the item finished as read (a pending item under a stopped job: when its job stopped, the time the
    reconciler writes for it too); the query joins ``jobs``."""
    return func.coalesce(Item.finished_at, case((settled_pending(), Job.finished_at)))


def counts_by_state(session: Session) -> dict[str, int]:
    """Every job's items per state as read (the metrics gauge): one grouped count over the stored states, and one
    count of the pending items of stopped jobs (an index probe per stopped job)."""
    counts = dict.fromkeys(ItemState.ALL, 0)
    for state, n in session.execute(select(Item.state, func.count()).group_by(Item.state)):
        counts[state] = int(n)
    unsettled = unsettled_count(session)
    counts[ItemState.PENDING] -= unsettled
    counts[ItemState.CANCELLED] += unsettled
    return counts


def unsettled_count(session: Session, job_id: str | None = None) -> int:
    """Items stored ``pending`` under stopped jobs (of ``job_id`` only, when given), not yet rewritten."""
    query: Any = select(func.count()).select_from(Item).join(Job, Job.id == Item.job_id).where(settled_pending())
    if job_id is not None:
        query = query.where(Item.job_id == job_id)
    return int(session.scalar(query) or 0)
