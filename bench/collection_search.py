"""Hybrid search latency over a large collection (issue #37, "measured scale"), on SQLite and PostgreSQL.

    env -u REDIS_URL .venv/bin/python bench/collection_search.py [--chunks 100000] [--searches 50]
        [--database-url postgresql+psycopg://...] [--pgvector N] [--words 120] [--baseline] [--code int8|f32]

Fills a database built by the real migrations (``jobs.db.upgrade``) with ``--chunks`` synthetic chunks: random
unit vectors of 384 dimensions (all-minilm's width) and ``--words`` words each, drawn Zipf-wise from a generated
word list, in documents of 100 chunks, each document inserted and indexed in its own transaction as the worker's
apply does (``jobs.collection_search.index_document``).  Then it times ``--searches`` searches of each mode
(hybrid, vector only, text only, and hybrid with a filter passing about half the documents) and prints p50/p95.
``--baseline`` also times the vector leg as a scan of ``collection_chunks`` itself, the layout the blocks replace;
``--code f32`` packs float32 blocks instead of int8 ones.
``--pgvector N`` does the same on a private PostgreSQL 16 with pgvector (``pgserver``) with N chunks (HNSW).
Goal: hybrid p50 under 50 ms at 100k chunks on SQLite; under 50 ms at 1M on PostgreSQL with HNSW.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, text
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table
from corral.settings import Settings
from harness.stack import drop_everything
from jobs import collection_search as cs
from jobs.db import engine_for, upgrade
from jobs.models import Collection, CollectionChunk, CollectionDocument

DIMS = 384
PER_DOC = 100
DIGEST = "b" * 64
COLLECTION = "vs_bench"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "qa", "di", "fo", "gu", "ho", "ji"]


def vocabulary(size: int = 20000) -> list[str]:
    rng = np.random.default_rng(7)
    words = {"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))) for _ in range(size * 2)}
    return sorted(words)[:size]


def fill(sessions: sessionmaker[Session], chunks: int, words: int) -> float:
    """Insert and index the chunks a document at a time; returns the seconds it took."""
    vocab = np.array(vocabulary())
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    with sessions.begin() as session:
        session.add(Collection(id=COLLECTION, owner=None, name="bench", model="all-minilm", model_digest=DIGEST,
                               chunk_tokens=800, chunk_overlap=400, last_active_at=now, created_at=now))
    for first in range(0, chunks, PER_DOC):
        count = min(PER_DOC, chunks - first)
        vectors = rng.standard_normal((count, DIMS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        terms = vocab[np.minimum(rng.zipf(1.2, size=(count, words)) - 1, len(vocab) - 1)]
        with sessions.begin() as session:
            doc = CollectionDocument(collection_id=COLLECTION, source_id=f"doc-{first // PER_DOC}",
                                     filename=f"doc-{first // PER_DOC}.md", usage_bytes=0,
                                     attributes={"half": (first // PER_DOC) % 2 == 0}, status="completed",
                                     chunk_tokens=800, chunk_overlap=400, chunk_count=count)
            session.add(doc)
            session.flush()
            session.execute(insert(CollectionChunk), [
                {"collection_id": COLLECTION, "document_id": doc.id, "model_digest": DIGEST, "seq": n,
                 "text": " ".join(terms[n]), "start": 0, "end": 0, "tokens": words, "embedding": vectors[n].tobytes()}
                for n in range(count)])
            cs.index_document(session, doc.id)
        if first and first % 20000 == 0:
            print(f"  {first} chunks, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    fn()  # warm the caches once
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]


def measure(label: str, url: str, chunks: int, words: int, runs: int, baseline: bool) -> list[list[Any]]:
    sessions = sessionmaker(engine_for(url), expire_on_commit=False)
    seconds = fill(sessions, chunks, words)
    with sessions() as session:
        layout = cs._layout(session)
    vocab = vocabulary()
    rng = np.random.default_rng(1)
    queries = []
    for _ in range(runs + 1):
        q = rng.standard_normal(DIMS).astype(np.float32)
        queries.append((q / np.linalg.norm(q), " ".join(rng.choice(vocab[50:2000], size=3))))
    cursor = iter(range(10**9))

    def one(**kw: Any) -> Callable[[], Any]:
        def go() -> Any:
            q, words_ = queries[next(cursor) % len(queries)]
            return cs.search(sessions, collection_id=COLLECTION, model_digest=DIGEST, query_vectors=[q],
                             query_texts=[words_], k=10, **{"filters": None, **kw})
        return go

    rows = []
    for mode, kw in [("hybrid", {}), ("vector only", {"text_weight": 0}), ("text only", {"embedding_weight": 0}),
                     ("hybrid, filter ~50%", {"filters": {"key": "half", "type": "eq", "value": True}})]:
        p50, p95 = timed(one(**kw), runs)
        shown = f"{layout} ({cs.BLOCK_CODE})" if layout == "blocks" else layout
        rows.append([label, shown, chunks, f"{seconds:.0f}", mode, p50, p95])
    if baseline:
        def rows_scan() -> Any:
            q, _ = queries[next(cursor) % len(queries)]
            return cs._chunks_legs(sessions, COLLECTION, DIGEST, [q], None, 50)
        p50, p95 = timed(rows_scan, min(runs, 10))
        rows.append([label, "rows (baseline)", chunks, "", "vector leg only", p50, p95])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--searches", type=int, default=50)
    parser.add_argument("--database-url", help="a PostgreSQL of its own (emptied first) instead of SQLite")
    parser.add_argument("--pgvector", type=int, default=0, help="chunks on a private pgvector server (0: skip)")
    parser.add_argument("--baseline", action="store_true", help="also time a scan of collection_chunks")
    parser.add_argument("--code", choices=["int8", "f32"], default=cs.BLOCK_CODE, help="how blocks hold vectors")
    args = parser.parse_args()
    cs.BLOCK_CODE = args.code
    home = Path(tempfile.mkdtemp(prefix="corral-search-bench-"))
    rows: list[list[Any]] = []
    if args.chunks:
        url = args.database_url or f"sqlite:///{home / 'bench.db'}"
        if args.database_url:
            drop_everything(engine_for(url))
        upgrade(Settings(home=home, database_url=url))
        with engine_for(url).connect() as conn:
            conn.execute(text("SELECT 1"))
        rows += measure("sqlite" if url.startswith("sqlite") else "postgresql", url, args.chunks, args.words,
                        args.searches, args.baseline)
    if args.pgvector:
        import pgserver

        server = pgserver.get_server(home / "pgdata", cleanup_mode="stop")
        try:
            url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
            upgrade(Settings(home=home, database_url=url))
            rows += measure("pgvector", url, args.pgvector, args.words, args.searches, args.baseline)
            engine_for(url).dispose()
        finally:
            server.cleanup()
    print_table("Collection search latency (ms)", ["database", "vector layout", "chunks", "fill s", "mode", "p50 ms",
                                                    "p95 ms"], rows)


if __name__ == "__main__":
    main()
