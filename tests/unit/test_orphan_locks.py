"""The reconciler re-queues a lost worker's chunk without waiting on the row locks a lost host left behind.

A worker host cut off inside a transaction keeps that transaction's row locks on PostgreSQL until the server
ends its session (about 30 s: jobs/db.py's keepalives and idle timeout).  Re-queueing its chunk waited for them,
and the whole sweep with it: every other orphan, the expiries and the dispatch backstop (seen under load in
tests/integration/test_multihost.py's partition test).  Now the locked chunk waits for a later sweep and the
others are re-queued at once.  Here the lost host is a second connection holding the chunk's row.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from jobs import transitions
from jobs.db import engine_for
from jobs.models import Chunk, ChunkState, Item, ItemState
from jobs.reconcile import _orphaned
from tests.unit.test_cancel_cost import database, new_job  # noqa: F401  (database: the fixture, both databases)


@pytest.mark.parametrize("held", ["chunk", "item"])
def test_a_chunk_whose_rows_a_lost_transaction_holds_waits_and_the_others_are_requeued(
        database: str, held: str) -> None:  # noqa: F811
    """``held``: the row the lost transaction locked: the chunk's, or (as a worker cut inside its result write
    leaves it) one of its items', which the re-queue reaches after changing the chunk: that change is undone."""
    make = sessionmaker(engine_for(database), expire_on_commit=False)
    session = make()
    job_id, chunks = new_job(session, items=4, chunk_size=2)
    for chunk_id in chunks:
        assert transitions.claim_chunk(session, chunk_id, "cpu-1@gone", f"attempt-{chunk_id}") is not None
        session.execute(Item.__table__.update().where(Item.chunk_id == chunk_id).values(state=ItemState.RUNNING))
    session.commit()
    postgres = database.startswith("postgresql")
    lost = make() if postgres else None
    if lost is not None:  # the lost host's open transaction: it locked a row of the first chunk, then went silent
        row = (select(Chunk.id).where(Chunk.id == chunks[0]) if held == "chunk"
               else select(Item.id).where(Item.chunk_id == chunks[0]).limit(1))
        lost.execute(row.with_for_update())
    try:
        orphans = {c.id: c for c in transitions.running_chunks(session)}
        started = time.monotonic()
        first = _orphaned(session, orphans[chunks[0]])
        waited = time.monotonic() - started
        second = _orphaned(session, orphans[chunks[1]])
        session.commit()
        if postgres:
            assert (first, second) == ("locked", "requeued")
            assert waited < 5, waited  # bounded by the lock wait, not the lost session's 30 s
            assert session.scalar(text("SHOW lock_timeout")) == "0"  # the sweep's other statements wait as before
        else:
            assert (first, second) == ("requeued", "requeued")
        session.expire_all()
        rows = {c.id: c for c in session.scalars(select(Chunk).where(Chunk.job_id == job_id))}
        assert rows[chunks[1]].state == ChunkState.QUEUED
        if postgres:  # untouched: still the lost worker's, under its attempt, its items running
            assert (rows[chunks[0]].state, rows[chunks[0]].attempt) == (ChunkState.RUNNING, f"attempt-{chunks[0]}")
            assert set(session.scalars(select(Item.state).where(Item.chunk_id == chunks[0]))) == {ItemState.RUNNING}
        else:
            assert rows[chunks[0]].state == ChunkState.QUEUED
    finally:
        if lost is not None:
            lost.rollback()  # the database ended the lost session
            lost.close()
    if postgres:  # the next sweep re-queues it
        assert _orphaned(session, transitions.running_chunks(session)[0]) == "requeued"
        session.commit()
        session.expire_all()
        assert {c.state for c in session.scalars(select(Chunk).where(Chunk.job_id == job_id))} == {ChunkState.QUEUED}
        assert set(session.scalars(select(Item.state).where(Item.job_id == job_id))) == {ItemState.PENDING}
    session.close()
