"""Hybrid search over a collection's chunks: a keyword leg and a vector leg per query, fused by weighted RRF.

Keyword search is the database's own: SQLite FTS5 ranked by bm25 (migration 0012's ``collection_chunks_fts``),
PostgreSQL full text ranked by ``ts_rank_cd`` over the generated ``tsv`` column.  Raw user text is FTS5 syntax
("what is panda?" is a syntax error), so every term is quoted and the terms are OR-ed: a chunk need not hold every
word of a question to rank.

Vector search is exact cosine (the chunks' float32 vectors are L2-normalised, so a dot product) over a derived
index, ``collection_vectors``, in one of two layouts chosen by :func:`ensure_collection_index` at
``corral db upgrade``:

* **pgvector** (PostgreSQL with the extension): a row per chunk (``chunk_id`` -> ``collection_chunks`` ON DELETE
  CASCADE) and one partial HNSW index per collection and model, queried with iterative scans when filtered.
* **blocks** (SQLite, PostgreSQL without pgvector): the vectors packed ``BLOCK`` to a row (int8 by default), with
  their chunk and document ids.  At 100k chunks on the 2-core VM, a scan of ``collection_chunks`` row by row (each
  1.5 KB vector stored after the chunk's text) took 2.4 s p50 and float32 blocks 0.28 s (bench/collection_search.py,
  load average 8-11 from other builds); int8 blocks read a quarter of the bytes.  Blocks are only a candidate
  generator: the best ``2 * candidates`` are looked up in ``collection_chunks`` and rescored from their own float32
  vectors, so a chunk deleted since (a re-synced or deleted document) never comes back, and a score is always the
  chunk's exact cosine.  Deleted chunks' entries are dropped when :func:`index_chunks` next touches the collection
  and finds a block at least half dead.

Why :func:`index_chunks` is called by the worker's apply transaction rather than a lazy top-up at search (as
jobs/search.py does for ``item_vectors``): a collection's chunks are replaced, not only appended.  Chunk ids are
reused on SQLite (a rowid that was the largest is handed out again after a delete) and committed out of order on
PostgreSQL, so "index what is newer than the last indexed id" would miss chunks or keep stale vectors.  In the same
transaction, the index is exactly as current as the chunks: a search sees the old chunks or the new ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from jobs.search import vector_literal

VECTOR_TABLE = "collection_vectors"
BLOCK = 512  # vectors per packed row: 768 KB at 384 dims; appends rewrite at most one such blob per document
PAGE = 16  # blocks read per query to the database (memory: PAGE * BLOCK vectors)
# How blocks hold vectors: "int8" (each component times 127, rounded: a quarter of float32's bytes to read per
# search; candidates are rescored from the chunks' own float32 vectors, so scores stay exact) or "f32".  A block's
# code is told by its length, so blocks of either code can sit side by side.
BLOCK_CODE = "int8"
# SQLite reads the blocks' overflow pages from a memory map rather than a read() each: 2-3x faster scans here
# (bench/collection_search.py).  Page cache, not the process's own memory; SQLite caps it at 2 GB by default.
MMAP_BYTES = 2**31 - 2**16
RRF_K = 60
TERM = re.compile(r"\w+")

Executor = Session | Connection

BLOCKS_DDL = {
    "sqlite": [
        f"CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} (id INTEGER PRIMARY KEY, "
        "collection_id VARCHAR(40) NOT NULL REFERENCES collections (id) ON DELETE CASCADE, "
        "model_digest VARCHAR(64) NOT NULL, dims INTEGER NOT NULL, n INTEGER NOT NULL, "
        "min_chunk BIGINT NOT NULL, max_chunk BIGINT NOT NULL, chunk_ids BLOB NOT NULL, document_ids BLOB NOT NULL, "
        "vectors BLOB NOT NULL)",
    ],
    "postgresql": [
        f"CREATE TABLE IF NOT EXISTS {VECTOR_TABLE} (id BIGSERIAL PRIMARY KEY, "
        "collection_id VARCHAR(40) NOT NULL REFERENCES collections (id) ON DELETE CASCADE, "
        "model_digest VARCHAR(64) NOT NULL, dims INTEGER NOT NULL, n INTEGER NOT NULL, "
        "min_chunk BIGINT NOT NULL, max_chunk BIGINT NOT NULL, chunk_ids BYTEA NOT NULL, document_ids BYTEA NOT NULL, "
        "vectors BYTEA NOT NULL)",
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


@dataclass(frozen=True)
class Hit:
    """One chunk of the fused ranking: ``score`` in 0..1, and each leg's best rank and raw score (None where
    that leg did not find the chunk), for debugging and the bench."""

    chunk_id: int
    document_id: int
    score: float
    vector_rank: int | None = None
    text_rank: int | None = None
    vector_score: float | None = None
    text_score: float | None = None


# -- filters --------------------------------------------------------------------------------------------------


def matches(filter: dict[str, Any] | None, attributes: dict[str, Any] | None) -> bool:
    """Whether a document's ``attributes`` pass an OpenAI search filter (None passes everything).

    ComparisonFilter ``{key, type, value}`` with ``eq ne gt gte lt lte in nin``; CompoundFilter ``{type: and|or,
    filters}``, nested.  OpenAI does not document a missing key, so here a missing key (or a null value) never
    matches a comparison, ``ne`` and ``nin`` included: a filter states something about a key a document has.
    Types are compared strictly and never raise: a boolean is not the number 1, ``gt`` compares numbers with
    numbers and strings with strings, and anything else is no match."""
    if filter is None:
        return True
    kind = filter.get("type", "eq")
    if kind in ("and", "or"):
        results = (matches(f, attributes) for f in filter.get("filters") or [])
        return all(results) if kind == "and" else any(results)
    if not attributes or filter.get("key") not in attributes or attributes[filter["key"]] is None:
        return False
    have, want = attributes[filter["key"]], filter.get("value")
    if kind in ("in", "nin"):
        found = isinstance(want, list) and any(_equal(have, w) for w in want)
        return found if kind == "in" else isinstance(want, list) and not found
    if kind == "eq":
        return _equal(have, want)
    if kind == "ne":
        return not _equal(have, want)
    if not _comparable(have, want):
        return False
    if kind == "gt":
        return bool(have > want)
    if kind == "gte":
        return bool(have >= want)
    if kind == "lt":
        return bool(have < want)
    if kind == "lte":
        return bool(have <= want)
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def _comparable(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


def allowed_documents(session: Session, collection_id: str, filters: dict[str, Any] | None) -> list[int] | None:
    """The ids of the collection's documents that pass ``filters`` (None when there is no filter).  Attributes are
    a document's, not a chunk's, and a collection has far fewer documents than chunks: evaluated here in Python,
    the same on both databases, with OpenAI's semantics rather than two SQL dialects' JSON typing."""
    if filters is None:
        return None
    rows = session.execute(text("SELECT id, attributes FROM collection_documents WHERE collection_id = :c"),
                           {"c": collection_id}).all()
    return [int(doc_id) for doc_id, attrs in rows if matches(filters, _json(attrs))]


def _json(value: Any) -> dict[str, Any] | None:
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
    return parsed if isinstance(parsed, dict) else None


# -- the derived vector index ---------------------------------------------------------------------------------


def ensure_collection_index(conn: Connection) -> str:
    """Create ``collection_vectors`` in the layout this database gets (run by ``corral db upgrade`` beside
    jobs/search.py's ``ensure_vector_index``, which has made the ``vector`` extension where it can): returns
    ``"pgvector"`` or ``"blocks"``.  A PostgreSQL that gained pgvector since its blocks were built gets the
    pgvector layout, filled from the chunks; so does a new table where chunks already exist."""
    dialect = conn.dialect.name
    existed = _has_table(conn)
    if dialect == "postgresql" and conn.scalar(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")):
        if existed and _layout(conn) == "blocks":
            conn.execute(text(f"DROP TABLE {VECTOR_TABLE}"))
            existed = False
        for statement in PGVECTOR_DDL:
            conn.execute(text(statement))
        layout = "pgvector"
    else:
        if existed and _layout(conn) == "pgvector":  # the extension went away: fall back to blocks
            conn.execute(text(f"DROP TABLE {VECTOR_TABLE}"))
            existed = False
        for statement in BLOCKS_DDL.get(dialect, BLOCKS_DDL["sqlite"]):
            conn.execute(text(statement))
        conn.execute(text(BLOCKS_INDEX))
        layout = "blocks"
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
    """``pgvector``, ``blocks``, or None where the table does not exist (a database not upgraded since)."""
    if _dialect(conn) != "postgresql":
        return "blocks" if _has_table(conn) else None
    kind = conn.scalar(text(
        "SELECT max(attname) FROM pg_attribute WHERE attrelid = to_regclass(:t) AND attname IN ('vectors', 'embedding')"
    ), {"t": VECTOR_TABLE})
    return None if kind is None else "blocks" if kind == "vectors" else "pgvector"


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
    if not ids or layout is None:
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


def _pgvector_add(session: Executor, collection_id: str, digest: str, rows: list[Any]) -> None:
    dims = len(rows[0].embedding) // 4
    session.execute(text(
        f"INSERT INTO {VECTOR_TABLE} (chunk_id, collection_id, model_digest, document_id, embedding) "
        "VALUES (:id, :c, :m, :d, CAST(:v AS vector)) ON CONFLICT (chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding"
    ), [{"id": r.id, "c": collection_id, "m": digest, "d": r.document_id,
         "v": vector_literal(np.frombuffer(r.embedding, "<f4"))} for r in rows])
    session.execute(text(
        f"CREATE INDEX IF NOT EXISTS {_hnsw_name(collection_id, digest)} ON {VECTOR_TABLE} USING hnsw "
        f"((embedding::vector({dims})) vector_cosine_ops) "
        f"WHERE collection_id = {_quote(collection_id)} AND model_digest = {_quote(digest)}"))


def _hnsw_name(collection_id: str, digest: str) -> str:
    return "ix_collection_vectors_hnsw_" + hashlib.sha1(f"{collection_id}\0{digest}".encode()).hexdigest()[:16]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _blocks_add(session: Executor, collection_id: str, digest: str, rows: list[Any]) -> None:
    """Append to the collection's last block, then new ones; first drop any earlier entry of these ids (SQLite
    hands a deleted largest rowid out again), and rewrite blocks that have become at least half dead."""
    new_ids = np.array([r.id for r in rows], dtype="<i8")
    docs = np.array([r.document_id for r in rows], dtype="<i8")
    vectors = np.stack([np.frombuffer(r.embedding, "<f4") for r in rows])
    key = {"c": collection_id, "m": digest}
    stale = session.execute(text(
        f"SELECT id, chunk_ids, document_ids, vectors, dims FROM {VECTOR_TABLE} "
        "WHERE collection_id = :c AND model_digest = :m AND max_chunk >= :lo"), {**key, "lo": int(new_ids[0])}).all()
    for block in stale:
        held = np.frombuffer(block.chunk_ids, "<i8")
        keep = ~np.isin(held, new_ids)
        if not keep.all():
            _write_block(session, block.id, collection_id, digest, held[keep],
                         np.frombuffer(block.document_ids, "<i8")[keep],
                         _decode(block.vectors, len(held), block.dims)[keep])
    last = session.execute(text(
        f"SELECT id, n, dims, chunk_ids, document_ids, vectors FROM {VECTOR_TABLE} "
        "WHERE collection_id = :c AND model_digest = :m ORDER BY id DESC LIMIT 1"), key).first()
    if last is not None and last.n < BLOCK and last.dims == vectors.shape[1]:
        room = BLOCK - last.n
        _write_block(session, last.id, collection_id, digest,
                     np.concatenate([np.frombuffer(last.chunk_ids, "<i8"), new_ids[:room]]),
                     np.concatenate([np.frombuffer(last.document_ids, "<i8"), docs[:room]]),
                     np.concatenate([_decode(last.vectors, last.n, last.dims), vectors[:room]]))
        new_ids, docs, vectors = new_ids[room:], docs[room:], vectors[room:]
    for at in range(0, len(new_ids), BLOCK):
        _write_block(session, None, collection_id, digest, new_ids[at:at + BLOCK], docs[at:at + BLOCK],
                     vectors[at:at + BLOCK])
    compact(session, collection_id, digest)


def _write_block(session: Executor, block_id: int | None, collection_id: str, digest: str, ids: np.ndarray,
                 docs: np.ndarray, vectors: np.ndarray) -> None:
    if block_id is not None and len(ids) == 0:
        session.execute(text(f"DELETE FROM {VECTOR_TABLE} WHERE id = :id"), {"id": block_id})
        return
    values = {"c": collection_id, "m": digest, "dims": int(vectors.shape[1]), "n": len(ids),
              "lo": int(ids.min()), "hi": int(ids.max()), "ids": ids.astype("<i8").tobytes(),
              "docs": docs.astype("<i8").tobytes(), "v": _encode(vectors)}
    if block_id is None:
        session.execute(text(
            f"INSERT INTO {VECTOR_TABLE} (collection_id, model_digest, dims, n, min_chunk, max_chunk, chunk_ids, "
            "document_ids, vectors) VALUES (:c, :m, :dims, :n, :lo, :hi, :ids, :docs, :v)"), values)
    else:
        session.execute(text(
            f"UPDATE {VECTOR_TABLE} SET n = :n, dims = :dims, min_chunk = :lo, max_chunk = :hi, chunk_ids = :ids, "
            "document_ids = :docs, vectors = :v WHERE id = :id"), {**values, "id": block_id})


def _encode(vectors: np.ndarray) -> bytes:
    if BLOCK_CODE == "int8":
        return np.clip(np.rint(vectors * 127.0), -127, 127).astype(np.int8).tobytes()
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _decode(blob: bytes, n: int, dims: int) -> np.ndarray:
    """A block's vectors as float32 (int8 ones scaled back, so scores of blocks of either code compare)."""
    return _scores(blob, n, dims, None)


def _scores(blob: bytes, n: int, dims: int, matrix: np.ndarray | None) -> np.ndarray:
    """``vectors @ matrix`` for a block (the vectors themselves when ``matrix`` is None); int8 blocks scale the
    small query matrix rather than the block."""
    scale = np.float32(1 / 127)
    if len(blob) == 4 * n * dims:
        vectors = np.frombuffer(blob, "<f4").reshape(n, dims)
    else:
        vectors = np.frombuffer(blob, np.int8).reshape(n, dims).astype(np.float32)
        if matrix is None:
            vectors *= scale
        else:
            matrix = matrix * scale
    out: np.ndarray = vectors if matrix is None else vectors @ matrix
    return out


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
        block = session.execute(text(f"SELECT chunk_ids, document_ids, vectors, dims FROM {VECTOR_TABLE} WHERE id = :id"),
                                {"id": block_id}).one()
        held = np.frombuffer(block.chunk_ids, "<i8")
        alive = _existing(session, collection_id, digest, held.tolist())
        keep = np.isin(held, np.array(sorted(alive), dtype="<i8"))
        _write_block(session, block_id, collection_id, digest, held[keep], np.frombuffer(block.document_ids, "<i8")[keep],
                     _decode(block.vectors, len(held), block.dims)[keep])
        rewritten += 1
    return rewritten


def _existing(session: Executor, collection_id: str, digest: str, ids: list[int]) -> set[int]:
    found: set[int] = set()
    for at in range(0, len(ids), 1000):
        found.update(int(i) for i in session.scalars(text(
            f"SELECT id FROM collection_chunks WHERE id IN ({','.join(str(int(i)) for i in ids[at:at + 1000])}) "
            "AND collection_id = :c AND model_digest = :m"), {"c": collection_id, "m": digest}))
    return found


# -- the legs -------------------------------------------------------------------------------------------------

# A leg's ranking: (chunk id, document id, raw score), best first.
Ranked = list[tuple[int, int, float]]


def _doc_clause(session: Session, docs: list[int] | None, column: str) -> tuple[str, dict[str, Any]]:
    if docs is None:
        return "", {}
    if _dialect(session) == "postgresql":
        return f" AND {column} = ANY(:docs)", {"docs": docs}
    return f" AND {column} IN (SELECT value FROM json_each(:docs))", {"docs": json.dumps(docs)}


def fts_terms(query: str) -> str | None:
    """An FTS5 query that ORs every term of ``query``, each quoted (so ``?``, ``*``, ``"``, ``AND`` or ``NEAR`` in
    user text are words, not syntax); None when the text has no terms."""
    terms = TERM.findall(query)
    return " OR ".join(f'"{t}"' for t in terms) if terms else None


def text_leg(session: Session, collection_id: str, digest: str, query: str, docs: list[int] | None, n: int) -> Ranked:
    """The best ``n`` chunks for ``query`` by the database's keyword ranking (higher raw score is better)."""
    where, params = _doc_clause(session, docs, "c.document_id")
    params.update({"c": collection_id, "m": digest, "n": n})
    if _dialect(session) == "postgresql":
        rows = session.execute(text(
            "WITH q AS (SELECT CAST((SELECT string_agg('''' || replace(replace(lexeme, E'\\\\', E'\\\\\\\\'), '''', '''''') "
            "|| '''', ' | ') FROM unnest(to_tsvector('english', :q))) AS tsquery) AS tsq) "
            "SELECT c.id, c.document_id, ts_rank_cd(c.tsv, q.tsq) AS r FROM collection_chunks c, q "
            f"WHERE q.tsq IS NOT NULL AND c.tsv @@ q.tsq AND c.collection_id = :c AND c.model_digest = :m{where} "
            "ORDER BY r DESC, c.id LIMIT :n"), {**params, "q": query}).all()
        return [(int(i), int(d), float(r)) for i, d, r in rows]
    match = fts_terms(query)
    if match is None:
        return []
    rows = session.execute(text(
        "SELECT c.id, c.document_id, bm25(collection_chunks_fts) AS r FROM collection_chunks_fts "
        "JOIN collection_chunks c ON c.id = collection_chunks_fts.rowid "
        f"WHERE collection_chunks_fts MATCH :q AND c.collection_id = :c AND c.model_digest = :m{where} "
        "ORDER BY r, c.id LIMIT :n"), {**params, "q": match}).all()
    return [(int(i), int(d), -float(r)) for i, d, r in rows]  # bm25 is negated: smaller is better


def _normalized(vector: np.ndarray) -> np.ndarray:
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    return q / (np.linalg.norm(q) or 1.0)


def vector_legs(sessions: Callable[[], Session], collection_id: str, digest: str, queries: list[np.ndarray],
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
        return _blocks_legs(sessions, collection_id, digest, qs, docs, n)
    return _chunks_legs(sessions, collection_id, digest, qs, docs, n)


def _pgvector_leg(session: Session, collection_id: str, digest: str, q: np.ndarray, docs: list[int] | None,
                  n: int) -> Ranked:
    """HNSW over the collection's partial index (the cast and WHERE repeat the index's own), with an iterative
    scan when filtered so that a selective filter still fills ``n``; re-sorted since relaxed order may not be."""
    dims = int(q.shape[0])
    where, params = _doc_clause(session, docs, "document_id")
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(40, min(n, 1000))}"))
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
    session.rollback()  # SET LOCAL ends with the transaction
    return [(int(i), int(d), 1.0 - float(dist)) for i, d, dist in rows]


class _TopK:
    """A running best ``k`` (score, chunk id, document id) over pages, in bounded memory; ties by chunk id."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores = np.empty(0, np.float32)
        self.ids = np.empty(0, np.int64)
        self.docs = np.empty(0, np.int64)

    def add(self, scores: np.ndarray, ids: np.ndarray, docs: np.ndarray) -> None:
        if len(scores) > self.k:  # only a block's own best k can be among the best k (ties: all of the k-th score)
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


def _blocks_legs(sessions: Callable[[], Session], collection_id: str, digest: str, qs: list[np.ndarray],
                 docs: list[int] | None, n: int) -> list[Ranked]:
    """Scan the packed blocks a page at a time, all queries in one matrix product per block; then look the best
    ``2n`` of each query up in ``collection_chunks`` and rescore them from their own vectors (dead entries drop)."""
    dims = int(qs[0].shape[0])
    matrix = np.stack(qs, axis=1)  # dims x queries
    tops = [_TopK(2 * n) for _ in qs]
    allowed = None if docs is None else np.array(sorted(docs), dtype=np.int64)
    last = 0
    while True:
        with sessions() as session:
            if _dialect(session) == "sqlite":
                session.execute(text(f"PRAGMA mmap_size = {MMAP_BYTES}"))
            page = session.execute(text(
                f"SELECT id, n, chunk_ids, document_ids, vectors FROM {VECTOR_TABLE} WHERE collection_id = :c "
                f"AND model_digest = :m AND dims = :dims AND id > :last ORDER BY id LIMIT {PAGE}"),
                {"c": collection_id, "m": digest, "dims": dims, "last": last}).all()
        if not page:
            break
        last = page[-1].id
        for block in page:
            ids = np.frombuffer(block.chunk_ids, "<i8")
            owners = np.frombuffer(block.document_ids, "<i8")
            scores = _scores(block.vectors, block.n, dims, matrix)
            if allowed is not None:
                keep = np.isin(owners, allowed)
                ids, owners, scores = ids[keep], owners[keep], scores[keep]
            for j, top in enumerate(tops):
                top.add(scores[:, j], ids, owners)
    candidates = [top.ranked() for top in tops]
    wanted = sorted({c for ranked in candidates for c, _, _ in ranked})
    with sessions() as session:
        vectors = _chunk_vectors(session, collection_id, digest, wanted, dims)
    legs: list[Ranked] = []
    for q, ranked in zip(qs, candidates):
        live = [(c, vectors[c][0], float(vectors[c][1] @ q)) for c, _, _ in ranked if c in vectors]
        legs.append(sorted(live, key=lambda h: (-h[2], h[0]))[:n])
    return legs


def _chunk_vectors(session: Session, collection_id: str, digest: str, ids: list[int],
                   dims: int) -> dict[int, tuple[int, np.ndarray]]:
    out: dict[int, tuple[int, np.ndarray]] = {}
    for at in range(0, len(ids), 1000):
        for chunk_id, doc_id, blob in session.execute(text(
                "SELECT id, document_id, embedding FROM collection_chunks "
                f"WHERE id IN ({','.join(str(int(i)) for i in ids[at:at + 1000])}) "
                "AND collection_id = :c AND model_digest = :m"), {"c": collection_id, "m": digest}):
            if len(blob) == 4 * dims:
                out[int(chunk_id)] = (int(doc_id), np.frombuffer(blob, "<f4"))
    return out


def _chunks_legs(sessions: Callable[[], Session], collection_id: str, digest: str, qs: list[np.ndarray],
                 docs: list[int] | None, n: int) -> list[Ranked]:
    """The reference scan straight over ``collection_chunks`` (a database without ``collection_vectors``: one not
    upgraded since; also the bench's baseline): pages of ``PAGE * BLOCK`` rows by id."""
    dims = int(qs[0].shape[0])
    matrix = np.stack(qs, axis=1)
    tops = [_TopK(n) for _ in qs]
    last = 0
    while True:
        with sessions() as session:
            where, params = _doc_clause(session, docs, "document_id")
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


# -- fusion ---------------------------------------------------------------------------------------------------


def fuse(vector_legs: list[Ranked], text_legs: list[Ranked], *, embedding_weight: float, text_weight: float,
         k: int) -> list[Hit]:
    """Weighted reciprocal rank fusion (RRF, k = 60): ``sum(w / (60 + rank))`` over the legs, divided by its
    maximum ``sum(w / 61)`` so that a chunk first in every leg scores 1.  A vector-only search scores by the best
    cosine (clipped at 0), which means something on its own; a text-only search by the normalised RRF."""
    legs = [(embedding_weight, "vector", leg) for leg in vector_legs] + [(text_weight, "text", leg) for leg in text_legs]
    legs = [(w, kind, leg) for w, kind, leg in legs if w > 0]
    best = sum(w / (RRF_K + 1) for w, _, _ in legs)
    if not legs or best <= 0:
        return []
    fused: dict[int, dict[str, Any]] = {}
    for weight, kind, leg in legs:
        for rank, (chunk_id, doc_id, raw) in enumerate(leg, start=1):
            entry = fused.setdefault(chunk_id, {"doc": doc_id, "rrf": 0.0})
            entry["rrf"] += weight / (RRF_K + rank)
            if entry.get(f"{kind}_rank") is None or rank < entry[f"{kind}_rank"]:
                entry[f"{kind}_rank"] = rank
            if entry.get(f"{kind}_score") is None or raw > entry[f"{kind}_score"]:
                entry[f"{kind}_score"] = raw
    vector_only = all(kind == "vector" for _, kind, _ in legs)
    hits = [Hit(chunk_id=chunk_id, document_id=e["doc"],
                score=max(0.0, min(1.0, e["vector_score"])) if vector_only else min(1.0, e["rrf"] / best),
                vector_rank=e.get("vector_rank"), text_rank=e.get("text_rank"),
                vector_score=e.get("vector_score"), text_score=e.get("text_score"))
            for chunk_id, e in fused.items()]
    return sorted(hits, key=lambda h: (-h.score, h.chunk_id))[:k]


def search(sessions: Callable[[], Session], *, collection_id: str, model_digest: str, query_vectors: list[np.ndarray],
           query_texts: list[str], filters: dict[str, Any] | None, k: int, embedding_weight: float = 1.0,
           text_weight: float = 1.0, candidates: int | None = None) -> list[Hit]:
    """The ``k`` best chunks of a collection for one or more queries: a text leg per query text and a vector leg
    per query vector (a weight of 0 turns that modality off), over the chunks of ``model_digest`` only, limited
    to documents whose attributes pass ``filters``; fused by :func:`fuse`."""
    n = candidates or max(50, 4 * k)
    with sessions() as session:
        docs = allowed_documents(session, collection_id, filters)
        if docs is not None and not docs:
            return []
        texts = ([text_leg(session, collection_id, model_digest, q, docs, n) for q in query_texts if TERM.search(q)]
                 if text_weight > 0 else [])
    vectors = vector_legs(sessions, collection_id, model_digest, query_vectors, docs, n) if embedding_weight > 0 else []
    return fuse(vectors, texts, embedding_weight=embedding_weight, text_weight=text_weight, k=k)


def hydrate(session: Session, hits: list[Hit]) -> list[dict[str, Any]]:
    """The rows a search answers with, best first: each hit's chunk text and offsets, and its document."""
    if not hits:
        return []
    rows = session.execute(text(
        "SELECT c.id, c.document_id, c.text, c.start, c.\"end\", c.seq, d.file_id, d.source_id, d.filename, "
        "d.attributes FROM collection_chunks c JOIN collection_documents d ON d.id = c.document_id "
        f"WHERE c.id IN ({','.join(str(int(h.chunk_id)) for h in hits)})")).all()
    by_id = {int(r.id): r for r in rows}
    return [{"chunk_id": h.chunk_id, "document_id": h.document_id, "file_id": r.file_id, "source_id": r.source_id,
             "filename": r.filename, "attributes": _json(r.attributes), "text": r.text, "start": r.start,
             "end": r.end, "seq": r.seq, "score": h.score}
            for h in hits if (r := by_id.get(h.chunk_id)) is not None]
