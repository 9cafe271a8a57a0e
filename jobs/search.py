"""Nearest-chunk search over an embedding job's vectors: pgvector where the database has it, a numpy scan elsewhere.

The items' float32 blobs stay the one source of truth: a worker writes each exactly once, under its claim, and
never needs the extension.  On PostgreSQL with the ``vector`` extension, ``item_vectors`` is a search index
derived from them: a job's first search copies its vectors in, later searches top it up with the items that
finished since, and PostgreSQL ranks them (``<=>``, cosine distance, exact).  So a database that gains pgvector
after jobs ran indexes those jobs on their next search, and a result written once is indexed at most once
(primary key on item and vector, ``ON CONFLICT DO NOTHING``).

The table is not an Alembic model: it exists only where the extension does.  :func:`ensure_vector_index` creates
it (and the extension, where available and permitted) on every ``corral db upgrade``, which ``corral up`` and
``corral serve`` run at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from sqlalchemy import Connection, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from jobs.models import Item, ItemState

log = logging.getLogger(__name__)

PAGE = 2000
VECTOR_TABLE = "item_vectors"
CREATE_VECTOR_TABLE = f"""
CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} (
    item_id BIGINT NOT NULL REFERENCES job_items (id) ON DELETE CASCADE,
    vector_index INTEGER NOT NULL,
    job_id VARCHAR(40) NOT NULL,
    embedding vector NOT NULL,
    PRIMARY KEY (item_id, vector_index)
)"""
CREATE_VECTOR_JOB_INDEX = f"CREATE INDEX IF NOT EXISTS ix_{VECTOR_TABLE}_job_id ON {VECTOR_TABLE} (job_id)"

# A hit before hydration: (cosine similarity, item id, index of the vector within the item's input list).
Hit = tuple[float, int, int]


def ensure_vector_index(conn: Connection) -> bool:
    """On PostgreSQL, make pgvector usable if it can be: create the extension where the server has it (this
    needs a role allowed to; a failure leaves the numpy scan in charge) and the ``item_vectors`` table.
    Returns whether search will use pgvector; SQLite and a server without the extension answer False."""
    if conn.dialect.name != "postgresql":
        return False
    if not conn.scalar(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")):
        if not conn.scalar(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")):
            return False
        try:
            with conn.begin_nested():
                conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        except DBAPIError as exc:
            log.warning("pgvector is installed on the server but CREATE EXTENSION vector failed (%s); "
                        "search uses a numpy scan until someone allowed to runs it", exc.orig)
            return False
    conn.execute(text(CREATE_VECTOR_TABLE))
    conn.execute(text(CREATE_VECTOR_JOB_INDEX))
    return True


def uses_pgvector(session: Session) -> bool:
    """Whether this database has the derived vector index (a catalog lookup, cheap enough for every search)."""
    if session.get_bind().dialect.name != "postgresql":
        return False
    return session.scalar(text(f"SELECT to_regclass('{VECTOR_TABLE}') IS NOT NULL")) is True


def normalized(query: np.ndarray) -> np.ndarray:
    q = np.asarray(query, dtype=np.float32)
    return q / (np.linalg.norm(q) or 1.0)


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form, ``[x,y,...]``, with float32's 9 significant digits (exact round trip)."""
    return "[" + ",".join(format(x, ".9g") for x in vector.tolist()) + "]"


def _vectors(blob: bytes | None, output: dict[str, Any] | None, dims: int) -> np.ndarray | None:
    """An item's stored vectors, or None when it has none of the query's width (another ``dimensions``)."""
    if blob is None or not output or int(output["dims"]) != dims:
        return None
    return np.frombuffer(blob, dtype="<f4").reshape(-1, dims)


def numpy_top_k(sessions: Callable[[], Session], job_id: str, q: np.ndarray, k: int) -> list[Hit]:
    """Scan the job's vectors a page at a time: memory stays at one page plus the running top k.

    Stored vectors are L2-normalised, so the dot product with the normalised query is the cosine."""
    best: list[Hit] = []
    last_seq = -1
    while True:
        with sessions() as session:
            page = session.execute(
                select(Item.id, Item.seq, Item.embedding, Item.output)
                .where(Item.job_id == job_id, Item.state == ItemState.SUCCEEDED, Item.seq > last_seq)
                .order_by(Item.seq)
                .limit(PAGE)
            ).all()
        if not page:
            return best
        last_seq = page[-1].seq
        rows: list[np.ndarray] = []
        owners: list[tuple[int, int]] = []
        for item_id, _, blob, output in page:
            vectors = _vectors(blob, output, q.shape[0])
            if vectors is not None:
                rows.append(vectors)
                owners.extend((item_id, n) for n in range(vectors.shape[0]))
        if not rows:
            continue
        scores = np.concatenate(rows) @ q
        top = np.argsort(-scores)[:k]
        best.extend((float(scores[i]), *owners[i]) for i in top)
        best = sorted(best, key=lambda b: -b[0])[:k]


def sync_vector_index(sessions: Callable[[], Session], job_id: str) -> int:
    """Copy into ``item_vectors`` the job's finished vectors not there yet; returns how many rows were added."""
    added = 0
    while True:
        with sessions() as session:
            page = session.execute(
                select(Item.id, Item.embedding, Item.output)
                .where(Item.job_id == job_id, Item.state == ItemState.SUCCEEDED, Item.embedding.is_not(None))
                .where(text(f"NOT EXISTS (SELECT 1 FROM {VECTOR_TABLE} v WHERE v.item_id = job_items.id)"))
                .order_by(Item.seq)
                .limit(PAGE)
            ).all()
            rows: list[dict[str, Any]] = []
            for item_id, blob, output in page:
                vectors = _vectors(blob, output, int((output or {}).get("dims") or 0))
                if vectors is not None:
                    rows.extend({"item": item_id, "n": n, "job": job_id, "v": vector_literal(v)}
                                for n, v in enumerate(vectors))
            if rows:
                session.execute(
                    text(f"INSERT INTO {VECTOR_TABLE} (item_id, vector_index, job_id, embedding) "
                         "VALUES (:item, :n, :job, CAST(:v AS vector)) ON CONFLICT DO NOTHING"),
                    rows,
                )
                session.commit()
                added += len(rows)
        if len(page) < PAGE:
            return added


def pgvector_top_k(sessions: Callable[[], Session], job_id: str, q: np.ndarray, k: int) -> list[Hit]:
    """Let PostgreSQL rank the job's vectors by cosine distance (after topping the index up)."""
    sync_vector_index(sessions, job_id)
    with sessions() as session:
        rows = session.execute(
            text(f"SELECT item_id, vector_index, 1 - (embedding <=> CAST(:q AS vector)) AS score FROM {VECTOR_TABLE} "
                 "WHERE job_id = :job AND vector_dims(embedding) = :dims "
                 "ORDER BY embedding <=> CAST(:q AS vector), item_id, vector_index LIMIT :k"),
            {"q": vector_literal(q), "job": job_id, "dims": int(q.shape[0]), "k": k},
        ).all()
    return [(float(score), int(item_id), int(n)) for item_id, n, score in rows]


def top_k(sessions: Callable[[], Session], job_id: str, query: np.ndarray, k: int) -> tuple[str, list[Hit]]:
    """(the backend that ranked, the k best hits): ``pgvector`` where the index exists, else ``numpy``."""
    q = normalized(query)
    with sessions() as session:
        indexed = uses_pgvector(session)
    if indexed:
        return "pgvector", pgvector_top_k(sessions, job_id, q, k)
    return "numpy", numpy_top_k(sessions, job_id, q, k)


def hydrate(session: Session, hits: list[Hit]) -> list[dict[str, Any]]:
    """The API's result rows: each hit's chunk text, position and metadata, best first."""
    items = {i.id: i for i in session.scalars(select(Item).where(Item.id.in_([h[1] for h in hits])))}
    out = []
    for score, item_id, n in hits:
        item = items[item_id]
        body = item.input or {}
        inputs = body.get("input")
        text_ = inputs[n] if isinstance(inputs, list) else inputs
        hit: dict[str, Any] = {"custom_id": item.custom_id, "index": item.seq, "vector_index": n,
                               "score": round(score, 6), "text": text_}
        if "metadata" in body:
            hit["metadata"] = body["metadata"]
        out.append(hit)
    return out
