"""Hybrid search over a collection's chunks: a keyword leg and a vector leg per query, fused by weighted RRF.

Keyword search is the database's own: SQLite FTS5 ranked by bm25 (migration 0012's ``collection_chunks_fts``),
PostgreSQL full text over the generated ``tsv`` column, ranked by ``ts_rank`` per term weighted by the term's
inverse document frequency, for at most :data:`TEXT_CANDIDATES` chunks taken in tiers of evidence (the comment
above it says why).  Raw user text is FTS5 syntax
("what is panda?" is a syntax error), so every term is quoted and the terms are OR-ed: a chunk need not hold every
word of a question to rank.

Vector search, and the derived index it reads (``collection_vectors``: pgvector's HNSW, or sign-bit blocks
rescored from the chunks' float32 vectors), are jobs/collection_vectors.py's; its names that the API, the
worker's apply and ``corral db upgrade`` use are importable from here as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

from jobs.collection_vectors import (
    VECTOR_TABLE,
    Ranked,
    Sessions,
    _dialect,
    compact,
    doc_clause,
    ensure_collection_index,
    forget,
    index_chunks,
    index_document,
    vector_legs,
)

__all__ = ["VECTOR_TABLE", "Hit", "Ranked", "allowed_documents", "compact", "ensure_collection_index", "forget",
           "fts_terms", "fuse", "hydrate", "index_chunks", "index_document", "matches", "search", "snapshot",
           "text_leg", "vector_legs"]

RRF_K = 60
TERM = re.compile(r"\w+")


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


# -- the text leg -------------------------------------------------------------------------------------------


# PostgreSQL's keyword leg ranks at most TEXT_CANDIDATES chunks.  Ranking needs each matching row's tsvector
# from the heap, and GIN returns matches in no useful order: at a million chunks an OR of three ordinary words
# matched 10,000-110,000 rows, and reading them took 100-1,300 ms (about 7 us a row, a heap page each).  So the
# candidates are taken in tiers, best evidence first, each leaving out the ones before it, until the cap:
#   1. chunks holding every term;
#   2. chunks holding a rare term: one the planner's statistics on ``tsv`` (``pg_stats.most_common_elems``) do
#      not expect in as many rows as the cap, such as an error code or a name, which is what keyword search is
#      for (with no statistics yet, every term is rare, and this tier is the plain OR);
#   3. with three terms or more, chunks holding two of them;
#   4. only while fewer than ``n`` were found: chunks holding any term, the weakest evidence.
# So with no common term the candidates are exactly the OR's matches below the cap; what is left out is chunks
# holding one common term and nothing else, and a query of one common word ranks the first TEXT_CANDIDATES of
# its matches in the index's order.  Common is judged by the table's
# statistics (every collection's chunks, as FTS5's bm25 counts the whole table on SQLite).  The pair tier is
# built from the first PAIR_TERMS lexemes in alphabetical order (a 40-word question would make 780 pairs).
# The candidates are ranked as BM25 weighs terms: the sum over the query's terms of ts_rank for that term alone
# (which saturates with repetition) times the term's inverse document frequency, from the same statistics
# (a term they do not list is taken at half the rarest listed frequency; with no statistics every term weighs
# the same).  ts_rank_cd over the OR, which this replaced, has no IDF: a chunk repeating one common word of the
# question outranked one holding all of it, and on 100 manual pages text search found the page in its first
# 10 for 87 queries (MRR@10 0.634, hybrid 0.805 below vector alone); weighted, 99 (0.907, hybrid 0.937).
TEXT_CANDIDATES = 1000
PAIR_TERMS = 12
_QUOTED = "'''' || replace(replace(lexeme, E'\\\\', E'\\\\\\\\'), '''', '''''') || ''''"
_TIER = ("SELECT c.id FROM collection_chunks c, q WHERE c.tsv @@ q.{tsq} AND {{scope}} "
         "AND c.id NOT IN (SELECT id FROM {before}) LIMIT {limit}")
PG_TEXT_LEG = (
    f"WITH l AS (SELECT DISTINCT lexeme, {_QUOTED} AS t FROM unnest(to_tsvector('english', :q))), "
    "st AS (SELECT e.elem, e.freq FROM pg_stats p, "
    "unnest(CAST(CAST(p.most_common_elems AS text) AS text[]), p.most_common_elem_freqs) AS e(elem, freq) "
    "WHERE p.schemaname = (SELECT n.nspname FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace "
    "WHERE r.oid = CAST('collection_chunks' AS regclass)) AND p.tablename = 'collection_chunks' AND p.attname = 'tsv'), "
    "nr AS (SELECT GREATEST(reltuples, 0) AS n FROM pg_class WHERE oid = CAST('collection_chunks' AS regclass)), "
    "lf AS (SELECT l.t, COALESCE(st.freq, 0) * (SELECT n FROM nr) >= :cap AS common, "
    "COALESCE(st.freq, (SELECT min(freq) FROM st WHERE elem IS NOT NULL) / 2, 0) AS f "
    "FROM l LEFT JOIN st ON st.elem = l.lexeme), "
    "wt AS MATERIALIZED (SELECT CAST(t AS tsquery) AS tq, "
    "ln(1 + ((SELECT n FROM nr) * (1 - f) + 0.5) / ((SELECT n FROM nr) * f + 0.5)) AS idf FROM lf), "
    "w AS (SELECT t, row_number() OVER (ORDER BY t) AS i FROM l), "
    "s AS (SELECT (SELECT count(*) FROM l) AS m, "
    "CAST((SELECT string_agg(t, ' | ') FROM l) AS tsquery) AS any_term, "
    "CAST((SELECT string_agg(t, ' & ') FROM l) AS tsquery) AS all_terms, "
    "CAST((SELECT string_agg(t, ' | ') FROM lf WHERE NOT common) AS tsquery) AS rare_terms, "
    "CAST((SELECT string_agg(a.t || ' & ' || b.t, ' | ') FROM w a JOIN w b ON a.i < b.i AND b.i <= :pairs) "
    "AS tsquery) AS two_terms), "
    "q AS MATERIALIZED (SELECT any_term, CASE WHEN m > 1 THEN all_terms END AS tier1, rare_terms AS tier2, "
    "CASE WHEN m > 2 THEN two_terms END AS tier3 FROM s), "
    "t1 AS MATERIALIZED (SELECT c.id FROM collection_chunks c, q WHERE c.tsv @@ q.tier1 AND {scope} LIMIT :cap), "
    "t2 AS MATERIALIZED (" + _TIER.format(tsq="tier2", before="t1", limit=":cap - (SELECT count(*) FROM t1)") + "), "
    "t12 AS MATERIALIZED (SELECT id FROM t1 UNION ALL SELECT id FROM t2), "
    "t3 AS MATERIALIZED (" + _TIER.format(tsq="tier3", before="t12", limit=":cap - (SELECT count(*) FROM t12)") + "), "
    "t123 AS MATERIALIZED (SELECT id FROM t12 UNION ALL SELECT id FROM t3), "
    "t4 AS MATERIALIZED (" + _TIER.format(tsq="any_term", before="t123", limit=(
        "CASE WHEN (SELECT count(*) FROM t123) >= :n THEN 0 ELSE :cap - (SELECT count(*) FROM t123) END")) + ") "
    "SELECT c.id, c.document_id, (SELECT sum(wt.idf * ts_rank(c.tsv, wt.tq)) FROM wt) AS r FROM collection_chunks c "
    "WHERE c.id IN (SELECT id FROM t123 UNION ALL SELECT id FROM t4) ORDER BY r DESC, c.id LIMIT :n"
)


def fts_terms(query: str) -> str | None:
    """An FTS5 query that ORs every term of ``query``, each quoted (so ``?``, ``*``, ``"``, ``AND`` or ``NEAR`` in
    user text are words, not syntax); None when the text has no terms."""
    terms = TERM.findall(query)
    return " OR ".join(f'"{t}"' for t in terms) if terms else None


def text_leg(session: Session, collection_id: str, digest: str, query: str, docs: list[int] | None, n: int) -> Ranked:
    """The best ``n`` chunks for ``query`` by the database's keyword ranking (higher raw score is better)."""
    where, params = doc_clause(session, docs, "c.document_id")
    params.update({"c": collection_id, "m": digest, "n": n})
    if _dialect(session) == "postgresql":
        scope = f"c.collection_id = :c AND c.model_digest = :m{where}"
        rows = session.execute(text(PG_TEXT_LEG.format(scope=scope)),
                               {**params, "q": query, "cap": max(TEXT_CANDIDATES, n), "pairs": PAIR_TERMS}).all()
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


@contextmanager
def snapshot(sessions: Callable[[], Session]) -> Iterator[Sessions]:
    """One read snapshot for a whole search: its legs and :func:`hydrate` see the same chunks, so a document
    re-indexed meanwhile is found as it was or as it is, never lost between a leg and the hydrate (whose
    chunk ids would be gone).  REPEATABLE READ on PostgreSQL; on SQLite a read transaction, which WAL keeps
    beside the one writer.  Yields a factory to pass where a search takes ``sessions``."""
    with sessions() as session:
        if _dialect(session) == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        else:  # pysqlite opens transactions only before writes: ask for this one
            session.connection().exec_driver_sql("BEGIN")
        try:
            yield lambda: nullcontext(session)
        finally:
            session.rollback()


def searched_digest(session: Session, collection_id: str) -> str | None:
    """The digest of the model whose vectors the collection answers with, as ``session``'s snapshot sees it (None:
    the collection is gone).  A re-embed's switch (jobs/collection_index.py ``finish_reembed``) changes it and
    deletes the old model's chunks in one commit, so a search must embed its queries with the model read here."""
    digest: str | None = session.scalar(text("SELECT model_digest FROM collections WHERE id = :c"),
                                        {"c": collection_id})
    return digest


def search(sessions: Sessions, *, collection_id: str, model_digest: str, query_vectors: list[np.ndarray],
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
