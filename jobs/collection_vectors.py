"""The collections' derived vector index, ``collection_vectors``, and the vector leg of a search over it.

Vector search is cosine (the chunks' float32 vectors are L2-normalised, so a dot product) over one of two layouts
chosen by :func:`ensure_collection_index` at ``corral db upgrade``:

* **pgvector** (PostgreSQL with the extension): a row per chunk (``chunk_id`` -> ``collection_chunks`` ON DELETE
  CASCADE) and one partial HNSW index per collection and model, queried with iterative scans when filtered.
* **blocks** (SQLite, PostgreSQL without pgvector): the vectors' sign bits (one bit per dimension: 48 bytes for
  384 dimensions) packed ``BLOCK`` to a row with their chunk and document ids.  A search ranks every entry by
  Hamming distance to the query's own sign bits (``np.bitwise_count`` over 64-bit words), then looks the best
  ``max(RESCORE * n, RESCORE_MIN)`` up in ``collection_chunks`` and rescores them from their own float32
  vectors: a chunk deleted since (a re-synced or deleted document) never comes back, and a score is always the
  chunk's exact cosine.  At 100k chunks on the 2-core VM (bench/collection_search.py), a scan of
  ``collection_chunks`` row by row took 0.75-2.4 s, float32 blocks 0.28 s and int8 blocks 0.18 s (38 MB read
  and converted to float per search); the sign bits are 6.4 MB with their ids, need no conversion, and the
  vector leg took 18.5 ms p50 with recall@10 1.000 against the exact scan on all-minilm embeddings of manual
  pages (0.998 rescoring only 400; random vectors, the worst case for signs: bench/README.md, "Collections").
  Deleted chunks' entries are dropped when :func:`index_chunks` next touches the collection and finds a block
  at least half dead, and :func:`forget` drops a whole model's (a re-embed's switch, a deleted collection).

Why :func:`index_chunks` is called by the worker's apply transaction rather than a lazy top-up at search (as
jobs/search.py does for ``item_vectors``): a collection's chunks are replaced, not only appended.  Chunk ids are
reused on SQLite (a rowid that was the largest is handed out again after a delete) and committed out of order on
PostgreSQL, so "index what is newer than the last indexed id" would miss chunks or keep stale vectors.  In the same
transaction, the index is exactly as current as the chunks: a search sees the old chunks or the new ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from jobs.search import vector_literal

# Where a search's reads come from: a sessionmaker, or one snapshot's session lent again and again
# (jobs/collection_search.py ``snapshot``).
Sessions = Callable[[], AbstractContextManager[Session]]

VECTOR_TABLE = "collection_vectors"
BLOCK = 1024  # entries per packed row: 64 KB of bits and ids at 384 dims; an apply rewrites at most one such row
PAGE = 32  # blocks read per query to the database (memory: PAGE * BLOCK entries, 2 MB at 384 dims)
# Candidates rescored from float32 per query leg of n results.  Sign bits keep the order only roughly, so far
# more than n are rescored; recall@10 against the exact scan at 100k real embeddings: bench/README.md.
RESCORE = 20
RESCORE_MIN = 400

Executor = Session | Connection
# A leg's ranking: (chunk id, document id, raw score), best first.
Ranked = list[tuple[int, int, float]]

BLOCKS_DDL = {
    "sqlite": [
        f"CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} (id INTEGER PRIMARY KEY, "
        "collection_id VARCHAR(40) NOT NULL REFERENCES collections (id) ON DELETE CASCADE, "
        "model_digest VARCHAR(64) NOT NULL, dims INTEGER NOT NULL, n INTEGER NOT NULL, "
        "min_chunk BIGINT NOT NULL, max_chunk BIGINT NOT NULL, chunk_ids BLOB NOT NULL, document_ids BLOB NOT NULL, "
        "bits BLOB NOT NULL)",
    ],
    "postgresql": [
        f"CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} (id BIGSERIAL PRIMARY KEY, "
        "collection_id VARCHAR(40) NOT NULL REFERENCES collections (id) ON DELETE CASCADE, "
        "model_digest VARCHAR(64) NOT NULL, dims INTEGER NOT NULL, n INTEGER NOT NULL, "
        "min_chunk BIGINT NOT NULL, max_chunk BIGINT NOT NULL, chunk_ids BYTEA NOT NULL, document_ids BYTEA NOT NULL, "
        "bits BYTEA NOT NULL)",
    ],
}
BLOCKS_INDEX = f"CREATE INDEX IF NOT EXISTS ix_{VECTOR_TABLE}_blocks ON {VECTOR_TABLE} (collection_id, model_digest, id)"
PGVECTOR_DDL = [
    f"CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} ("
    "chunk_id BIGINT PRIMARY KEY REFERENCES collection_chunks (id) ON DELETE CASCADE, "
    "collection_id VARCHAR(40) NOT NULL, model_digest VARCHAR(64) NOT NULL, document_id BIGINT NOT NULL, "
    "embedding vector NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS ix_{VECTOR_TABLE}_collection ON {VECTOR_TABLE} (collection_id, model_digest)",
]


# -- the layouts ----------------------------------------------------------------------------------------------


def ensure_collection_index(conn: Connection) -> str:
    """Create ``collection_vectors`` in the layout this database gets (run by ``corral db upgrade`` beside
    jobs/search.py's ``ensure_vector_index``, which has made the ``vector`` extension where it can): returns
    ``"pgvector"`` or ``"blocks"``.  A table of another layout is dropped and this one filled from the chunks: a
    PostgreSQL that gained pgvector (or lost it) since, or blocks of an earlier code (int8 ``vectors``)."""
    dialect = conn.dialect.name
    existed = _has_table(conn)
    pgvector = dialect == "postgresql" and bool(conn.scalar(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")))
    layout = "pgvector" if pgvector else "blocks"
    if existed and _layout(conn) != layout:
        conn.execute(text(f"DROP TABLE {VECTOR_TABLE}"))
        existed = False
    if pgvector:
        for statement in PGVECTOR_DDL:
            conn.execute(text(statement))
    else:
        for statement in BLOCKS_DDL.get(dialect, BLOCKS_DDL["sqlite"]):
            conn.execute(text(statement))
        conn.execute(text(BLOCKS_INDEX))
    if not existed:
        last = 0
        while True:
            ids = [int(i) for i in conn.scalars(text("SELECT id FROM collection_chunks WHERE id > :last ORDER BY id "
                                                     "LIMIT 5000"), {"last": last})]
            if not ids:
                break
            index_chunks(conn, ids)
            last = ids[-1]
    return layout


def _dialect(conn: Executor) -> str:
    return conn.dialect.name if isinstance(conn, Connection) else conn.get_bind().dialect.name


def _has_table(conn: Executor) -> bool:
    if _dialect(conn) == "postgresql":
        return conn.scalar(text(f"SELECT to_regclass('{VECTOR_TABLE}') IS NOT NULL")) is True
    return bool(conn.scalar(text(f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{VECTOR_TABLE}'")) == 1)


def _layout(conn: Executor) -> str | None:
    """``pgvector``, ``blocks``, ``old`` (int8 or float32 blocks, before the sign bits: rebuilt by the next
    upgrade, searched by the row scan until then), or None where the table does not exist."""
    if _dialect(conn) == "postgresql":
        kind = conn.scalar(text(
            "SELECT max(attname) FROM pg_attribute WHERE attrelid = to_regclass(:t) "
            "AND attname IN ('bits', 'vectors', 'embedding')"), {"t": VECTOR_TABLE})
    else:
        kind = conn.scalar(text(
            f"SELECT max(name) FROM pragma_table_info('{VECTOR_TABLE}') WHERE name IN ('bits', 'vectors')"))
    return {None: None, "bits": "blocks", "embedding": "pgvector"}.get(kind, "old")


def index_document(session: Executor, document_id: int, model_digest: str | None = None) -> int:
    """Index a document's chunks (for an apply that bulk-inserted them without their ids): those of
    ``model_digest`` only when given, so a re-embed's apply does not index the current model's chunks again."""
    digest = "" if model_digest is None else " AND model_digest = :m"
    ids = [int(i) for i in session.scalars(text(f"SELECT id FROM collection_chunks WHERE document_id = :d{digest} "
                                                "ORDER BY id"), {"d": document_id, "m": model_digest})]
    index_chunks(session, ids)
    return len(ids)


def index_chunks(session: Executor, chunk_ids: Iterable[int]) -> None:
    """Add these chunks' vectors to ``collection_vectors``, in the caller's transaction (the worker's apply, right
    after it inserted them).  Indexing a chunk twice is harmless: its earlier entry is replaced."""
    ids = sorted(set(int(i) for i in chunk_ids))
    layout = _layout(session)
    if not ids or layout not in ("pgvector", "blocks"):
        return
    for start in range(0, len(ids), 1000):
        rows = session.execute(text(
            "SELECT id, collection_id, model_digest, document_id, embedding FROM collection_chunks "
            f"WHERE id IN ({','.join(str(i) for i in ids[start:start + 1000])}) ORDER BY id")).all()
        groups: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            groups.setdefault((row.collection_id, row.model_digest), []).append(row)
        for (collection_id, digest), group in groups.items():
            if layout == "pgvector":
                _pgvector_add(session, collection_id, digest, group)
            else:
                _blocks_add(session, collection_id, digest, group)


def forget(session: Executor, collection_id: str, model_digest: str | None) -> None:
    """Drop a collection's index entries of one model (None: of every model), in the caller's transaction: a
    re-embed's switch deletes the old model's chunks (jobs/collection_index.py ``finish_reembed``), and a
    deleted collection all of them.  Blocks of a model nobody indexes again would never be compacted, and a
    partial HNSW index outlives its rows.  (``DROP INDEX`` locks the table until the caller commits.)"""
    layout = _layout(session)
    if layout is None:
        return
    digest = "" if model_digest is None else " AND model_digest = :m"
    key = {"c": collection_id, "m": model_digest}
    if layout != "pgvector":
        session.execute(text(f"DELETE FROM {VECTOR_TABLE} WHERE collection_id = :c{digest}"), key)
        return
    digests = {model_digest} if model_digest is not None else {
        str(d) for table in (VECTOR_TABLE, "collection_chunks")
        for d in session.scalars(text(f"SELECT DISTINCT model_digest FROM {table} WHERE collection_id = :c"), key)}
    if model_digest is None:
        row = session.execute(text("SELECT model_digest, next_digest FROM collections WHERE id = :c"), key).first()
        digests.update(str(d) for d in (row or ()) if d)
    session.execute(text(f"DELETE FROM {VECTOR_TABLE} WHERE collection_id = :c{digest}"), key)
    for d in sorted(digests):
        session.execute(text(f"DROP INDEX IF EXISTS {_hnsw_name(collection_id, d)}"))


def _pgvector_add(session: Executor, collection_id: str, digest: str, rows: list[Any]) -> None:
    dims = len(rows[0].embedding) // 4
    session.execute(text(
        f"INSERT INTO {VECTOR_TABLE} (chunk_id, collection_id, model_digest, document_id, embedding) "
        "VALUES (:id, :c, :m, :d, CAST(:v AS vector)) ON CONFLICT (chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding"
    ), [{"id": r.id, "c": collection_id, "m": digest, "d": r.document_id,
         "v": vector_literal(np.frombuffer(r.embedding, "<f4"))} for r in rows])
    session.execute(text(hnsw_ddl(collection_id, digest, dims)))


# The HNSW graph's build settings: pgvector's m (16) with ef_construction 200 instead of its 64.  Measured by
# bench/pgvector_recall.py (20,000 chunks, 100 two-word queries, 2026-12-07): recall@10 at ef_search 200 went
# 0.877 -> 0.934 for the same 3.2 ms p50, at a build of 9 s instead of 5; m 32 reached 0.975 but at 4.4 ms and
# twice the build.  An index made before keeps its graph (CREATE ... IF NOT EXISTS) until it is made again.
HNSW_WITH = "m = 16, ef_construction = 200"


def hnsw_ddl(collection_id: str, digest: str, dims: int) -> str:
    """The partial HNSW index of one collection and model (made by its first apply; a bulk load makes it after
    its rows, which builds it far faster than row by row)."""
    return (f"CREATE INDEX IF NOT EXISTS {_hnsw_name(collection_id, digest)} ON {VECTOR_TABLE} USING hnsw "
            f"((embedding::vector({dims})) vector_cosine_ops) WITH ({HNSW_WITH}) "
            f"WHERE collection_id = {_quote(collection_id)} AND model_digest = {_quote(digest)}")


def _hnsw_name(collection_id: str, digest: str) -> str:
    return "ix_collection_vectors_hnsw_" + hashlib.sha1(f"{collection_id}\0{digest}".encode()).hexdigest()[:16]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sign_bits(vectors: np.ndarray) -> np.ndarray:
    """Each vector's signs, one bit per dimension (set where positive), padded to whole 64-bit words: a
    ``(len, words)`` uint64 array, whose bytes are what a block stores."""
    v = np.atleast_2d(vectors)
    words = -(-v.shape[1] // 64)
    packed = np.zeros((v.shape[0], 8 * words), np.uint8)
    packed[:, : -(-v.shape[1] // 8)] = np.packbits(v > 0, axis=1)
    return packed.view("<u8")


def _codes(blob: bytes, n: int) -> np.ndarray:
    return np.frombuffer(blob, "<u8").reshape(n, -1)


def _blocks_add(session: Executor, collection_id: str, digest: str, rows: list[Any]) -> None:
    """Append to the collection's last block, then new ones; first drop any earlier entry of these ids (SQLite
    hands a deleted largest rowid out again), and rewrite blocks that have become at least half dead."""
    new_ids = np.array([r.id for r in rows], dtype="<i8")
    docs = np.array([r.document_id for r in rows], dtype="<i8")
    vectors = np.stack([np.frombuffer(r.embedding, "<f4") for r in rows])
    dims, codes = vectors.shape[1], sign_bits(vectors)
    key = {"c": collection_id, "m": digest}
    stale = session.execute(text(
        f"SELECT id, n, dims, chunk_ids, document_ids, bits FROM {VECTOR_TABLE} "
        "WHERE collection_id = :c AND model_digest = :m AND max_chunk >= :lo"), {**key, "lo": int(new_ids[0])}).all()
    for block in stale:
        held = np.frombuffer(block.chunk_ids, "<i8")
        keep = ~np.isin(held, new_ids)
        if not keep.all():
            _write_block(session, block.id, collection_id, digest, block.dims, held[keep],
                         np.frombuffer(block.document_ids, "<i8")[keep], _codes(block.bits, block.n)[keep])
    last = session.execute(text(
        f"SELECT id, n, dims, chunk_ids, document_ids, bits FROM {VECTOR_TABLE} "
        "WHERE collection_id = :c AND model_digest = :m ORDER BY id DESC LIMIT 1"), key).first()
    if last is not None and last.n < BLOCK and last.dims == dims:
        room = BLOCK - last.n
        _write_block(session, last.id, collection_id, digest, dims,
                     np.concatenate([np.frombuffer(last.chunk_ids, "<i8"), new_ids[:room]]),
                     np.concatenate([np.frombuffer(last.document_ids, "<i8"), docs[:room]]),
                     np.concatenate([_codes(last.bits, last.n), codes[:room]]))
        new_ids, docs, codes = new_ids[room:], docs[room:], codes[room:]
    for at in range(0, len(new_ids), BLOCK):
        _write_block(session, None, collection_id, digest, dims, new_ids[at:at + BLOCK], docs[at:at + BLOCK],
                     codes[at:at + BLOCK])
    compact(session, collection_id, digest)


def _write_block(session: Executor, block_id: int | None, collection_id: str, digest: str, dims: int,
                 ids: np.ndarray, docs: np.ndarray, codes: np.ndarray) -> None:
    if block_id is not None and len(ids) == 0:
        session.execute(text(f"DELETE FROM {VECTOR_TABLE} WHERE id = :id"), {"id": block_id})
        return
    values = {"c": collection_id, "m": digest, "dims": int(dims), "n": len(ids), "lo": int(ids.min()),
              "hi": int(ids.max()), "ids": ids.astype("<i8").tobytes(), "docs": docs.astype("<i8").tobytes(),
              "v": np.ascontiguousarray(codes, "<u8").tobytes()}
    if block_id is None:
        session.execute(text(
            f"INSERT INTO {VECTOR_TABLE} (collection_id, model_digest, dims, n, min_chunk, max_chunk, chunk_ids, "
            "document_ids, bits) VALUES (:c, :m, :dims, :n, :lo, :hi, :ids, :docs, :v)"), values)
    else:
        session.execute(text(
            f"UPDATE {VECTOR_TABLE} SET n = :n, dims = :dims, min_chunk = :lo, max_chunk = :hi, chunk_ids = :ids, "
            "document_ids = :docs, bits = :v WHERE id = :id"), {**values, "id": block_id})


def compact(session: Executor, collection_id: str, digest: str) -> int:
    """Rewrite the collection's blocks that are at least half dead (their chunks deleted: a re-synced or removed
    document), keeping the live entries; returns how many blocks were rewritten.  Two counts first (entries held,
    chunks live), so an apply into a clean collection pays one index count; then live entries are counted per
    block by id range through ``ix_collection_chunks_collection``, one aggregate for all blocks."""
    key = {"c": collection_id, "m": digest}
    held = session.scalar(text(f"SELECT sum(n) FROM {VECTOR_TABLE} WHERE collection_id = :c AND model_digest = :m"), key)
    live = session.scalar(text("SELECT count(*) FROM collection_chunks WHERE collection_id = :c AND model_digest = :m"),
                          key)
    if not held or int(held) <= int(live or 0) * 5 // 4:  # under a fifth of the entries dead: not worth a look
        return 0
    counts = session.execute(text(
        f"SELECT b.id, b.n, (SELECT count(*) FROM collection_chunks c WHERE c.collection_id = b.collection_id "
        "AND c.model_digest = b.model_digest AND c.id BETWEEN b.min_chunk AND b.max_chunk) AS live "
        f"FROM {VECTOR_TABLE} b WHERE b.collection_id = :c AND b.model_digest = :m"), key).all()
    rewritten = 0
    for block_id, n, live in counts:
        if live * 2 > n:
            continue
        block = session.execute(text(f"SELECT n, dims, chunk_ids, document_ids, bits FROM {VECTOR_TABLE} "
                                     "WHERE id = :id"), {"id": block_id}).one()
        held = np.frombuffer(block.chunk_ids, "<i8")
        alive = _existing(session, collection_id, digest, held.tolist())
        keep = np.isin(held, np.array(sorted(alive), dtype="<i8"))
        _write_block(session, block_id, collection_id, digest, block.dims, held[keep],
                     np.frombuffer(block.document_ids, "<i8")[keep], _codes(block.bits, block.n)[keep])
        rewritten += 1
    return rewritten


def _existing(session: Executor, collection_id: str, digest: str, ids: list[int]) -> set[int]:
    found: set[int] = set()
    for at in range(0, len(ids), 1000):
        found.update(int(i) for i in session.scalars(text(
            f"SELECT id FROM collection_chunks WHERE id IN ({','.join(str(int(i)) for i in ids[at:at + 1000])}) "
            "AND collection_id = :c AND model_digest = :m"), {"c": collection_id, "m": digest}))
    return found


# -- the vector leg ---------------------------------------------------------------------------------------------


def doc_clause(session: Executor, docs: list[int] | None, column: str) -> tuple[str, dict[str, Any]]:
    """SQL limiting ``column`` to the document ids ``docs`` (nothing when None), and its parameters."""
    if docs is None:
        return "", {}
    if _dialect(session) == "postgresql":
        return f" AND {column} = ANY(:docs)", {"docs": docs}
    return f" AND {column} IN (SELECT value FROM json_each(:docs))", {"docs": json.dumps(docs)}


def _normalized(vector: np.ndarray) -> np.ndarray:
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    return q / (np.linalg.norm(q) or 1.0)


def vector_legs(sessions: Sessions, collection_id: str, digest: str, queries: list[np.ndarray],
                docs: list[int] | None, n: int) -> list[Ranked]:
    """The best ``n`` chunks by cosine for each query vector, from whichever layout the database has."""
    qs = [_normalized(q) for q in queries]
    if not qs:
        return []
    with sessions() as session:
        layout = _layout(session)
        if layout == "pgvector":
            return [_pgvector_leg(session, collection_id, digest, q, docs, n) for q in qs]
    if layout == "blocks":
        return blocks_legs(sessions, collection_id, digest, qs, docs, n)
    return chunks_legs(sessions, collection_id, digest, qs, docs, n)


# HNSW's candidate list per search (pgvector's default is 40).  Short queries sit far from the chunks they match,
# where the graph search stops early: bench/collections_scale.py's 100k-chunk run found recall@10 against the exact
# scan at 0.5 with ef_search 40 (worst query 0.0).  bench/pgvector_recall.py, 20,000 all-minilm chunks of ~100
# tokens and 100 two-word queries (2026-12-07, 2-core Intel Xeon VM): recall@10 0.587 at 40, 0.741 at 100, 0.860
# at 200, 0.929 at 400, 0.979 at 1000, for a p50 of 1.3, 2.0, 3.4, 5.1 and 13.0 ms (a second build of the same
# graph: 0.646, 0.781, 0.877, 0.936, 0.982; HNSW's levels are drawn at random), and 0.934 at 200 on the graph of
# HNSW_WITH.  200 keeps the 1M-chunk hybrid search near its 50 ms goal (38.9 ms at 50) while recall rises most per
# millisecond.
EF_SEARCH_MIN = 200


def _pgvector_leg(session: Session, collection_id: str, digest: str, q: np.ndarray, docs: list[int] | None,
                  n: int) -> Ranked:
    """HNSW over the collection's partial index (the cast and WHERE repeat the index's own), with an iterative
    scan when filtered so that a selective filter still fills ``n``; re-sorted since relaxed order may not be."""
    dims = int(q.shape[0])
    where, params = doc_clause(session, docs, "document_id")
    # SET LOCAL inside a savepoint, rolled back after: the settings end there, and a search's snapshot goes on
    scope = session.begin_nested()
    try:
        session.execute(text(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH_MIN, min(n, 1000))}"))
        if docs is not None:
            try:
                with session.begin_nested():
                    session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
            except DBAPIError:  # pgvector before 0.8: a filtered query may return fewer than n
                pass
        distance = f"embedding::vector({dims}) <=> CAST(:q AS vector({dims}))"
        rows = session.execute(text(
            f"WITH hits AS MATERIALIZED (SELECT chunk_id, document_id, {distance} AS d FROM {VECTOR_TABLE} "
            f"WHERE collection_id = :c AND model_digest = :m AND vector_dims(embedding) = {dims}{where} "
            f"ORDER BY {distance} LIMIT :n) SELECT chunk_id, document_id, d FROM hits ORDER BY d + 0, chunk_id"),
            {**params, "c": collection_id, "m": digest, "q": vector_literal(q), "n": n}).all()
    finally:
        scope.rollback()
    return [(int(i), int(d), 1.0 - float(dist)) for i, d, dist in rows]


class _TopK:
    """A running best ``k`` (score, chunk id, document id) over pages, in bounded memory; ties by chunk id."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = np.empty(0, np.float32)
        self.ids = np.empty(0, np.int64)
        self.docs = np.empty(0, np.int64)

    def add(self, scores: np.ndarray, ids: np.ndarray, docs: np.ndarray) -> None:
        if len(scores) > self.k:  # only a page's own best k can be among the best k (ties: all of the k-th score)
            cut = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            keep = scores >= cut
            scores, ids, docs = scores[keep], ids[keep], docs[keep]
        self.scores = np.concatenate([self.scores, scores])
        self.ids = np.concatenate([self.ids, ids])
        self.docs = np.concatenate([self.docs, docs])
        if len(self.scores) > 4 * self.k:
            self._trim()

    def _trim(self) -> None:
        order = np.lexsort((self.ids, -self.scores))[: self.k]
        self.scores, self.ids, self.docs = self.scores[order], self.ids[order], self.docs[order]

    def ranked(self) -> Ranked:
        self._trim()
        return [(int(i), int(d), float(s)) for s, i, d in zip(self.scores, self.ids, self.docs)]


def blocks_legs(sessions: Sessions, collection_id: str, digest: str, qs: list[np.ndarray],
                docs: list[int] | None, n: int, rescore: int | None = None) -> list[Ranked]:
    """Scan the blocks a page at a time and keep each query's ``rescore`` entries nearest by Hamming distance
    (default ``max(RESCORE * n, RESCORE_MIN)``; ties by chunk id); then look those up in ``collection_chunks``
    and rank them by their exact cosine (dead entries drop)."""
    dims = int(qs[0].shape[0])
    wanted_bits = sign_bits(np.stack(qs))
    tops = [_TopK(rescore or max(RESCORE * n, RESCORE_MIN)) for _ in qs]
    allowed = None if docs is None else np.array(sorted(docs), dtype=np.int64)
    last = 0
    while True:
        with sessions() as session:
            page = session.execute(text(
                f"SELECT id, n, chunk_ids, document_ids, bits FROM {VECTOR_TABLE} WHERE collection_id = :c "
                f"AND model_digest = :m AND dims = :dims AND id > :last ORDER BY id LIMIT {PAGE}"),
                {"c": collection_id, "m": digest, "dims": dims, "last": last}).all()
        if not page:
            break
        last = page[-1].id
        ids = np.frombuffer(b"".join(b.chunk_ids for b in page), "<i8")
        owners = np.frombuffer(b"".join(b.document_ids for b in page), "<i8")
        codes = np.frombuffer(b"".join(b.bits for b in page), "<u8").reshape(len(ids), -1)
        if allowed is not None:
            keep = np.isin(owners, allowed)
            ids, owners, codes = ids[keep], owners[keep], codes[keep]
        for q_bits, top in zip(wanted_bits, tops):
            distance = np.bitwise_count(codes ^ q_bits).sum(axis=1, dtype=np.int32)
            top.add(-distance.astype(np.float32), ids, owners)
    for top in tops:
        top._trim()
    wanted = np.unique(np.concatenate([top.ids for top in tops]))
    with sessions() as session:
        ids, owners, vectors = _chunk_vectors(session, collection_id, digest, wanted.tolist(), dims)
    if not len(ids):
        return [[] for _ in qs]
    legs: list[Ranked] = []
    for q, top in zip(qs, tops):
        rows = np.searchsorted(ids, top.ids)
        rows = rows[(rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == top.ids)]  # live chunks only
        scores = vectors[rows] @ q
        best = rows[np.lexsort((ids[rows], -scores))[:n]]
        legs.append([(int(ids[r]), int(owners[r]), float(vectors[r] @ q)) for r in best])
    return legs


def _chunk_vectors(session: Session, collection_id: str, digest: str, ids: list[int],
                   dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The live chunks among ``ids``, by id: their ids, document ids and float32 vectors (one row each)."""
    found: list[Any] = []
    for at in range(0, len(ids), 1000):
        found.extend(session.execute(text(
            "SELECT id, document_id, embedding FROM collection_chunks "
            f"WHERE id IN ({','.join(str(int(i)) for i in ids[at:at + 1000])}) "
            "AND collection_id = :c AND model_digest = :m ORDER BY id"), {"c": collection_id, "m": digest}).all())
    found = [r for r in found if len(r.embedding) == 4 * dims]
    return (np.array([r.id for r in found], dtype=np.int64), np.array([r.document_id for r in found], dtype=np.int64),
            np.frombuffer(b"".join(r.embedding for r in found), "<f4").reshape(len(found), dims))


def chunks_legs(sessions: Sessions, collection_id: str, digest: str, qs: list[np.ndarray],
                docs: list[int] | None, n: int) -> list[Ranked]:
    """The exact scan straight over ``collection_chunks`` (a database without current ``collection_vectors``:
    one not upgraded since; also the bench's baseline and recall reference): pages of ``PAGE * BLOCK`` rows."""
    dims = int(qs[0].shape[0])
    matrix = np.stack(qs, axis=1)
    tops = [_TopK(n) for _ in qs]
    last = 0
    while True:
        with sessions() as session:
            where, params = doc_clause(session, docs, "document_id")
            page = session.execute(text(
                "SELECT id, document_id, embedding FROM collection_chunks WHERE collection_id = :c AND model_digest = :m "
                f"AND id > :last{where} ORDER BY id LIMIT {PAGE * BLOCK}"),
                {**params, "c": collection_id, "m": digest, "last": last}).all()
        if not page:
            break
        last = page[-1].id
        rows = [r for r in page if len(r.embedding) == 4 * dims]
        if not rows:
            continue
        scores = np.frombuffer(b"".join(r.embedding for r in rows), "<f4").reshape(len(rows), dims) @ matrix
        ids = np.array([r.id for r in rows], dtype=np.int64)
        owners = np.array([r.document_id for r in rows], dtype=np.int64)
        for j, top in enumerate(tops):
            top.add(scores[:, j], ids, owners)
    return [top.ranked() for top in tops]
