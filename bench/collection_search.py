"""Hybrid search latency over a large collection (issue #37, "measured scale"), and the vector leg's recall.

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python bench/collection_search.py [--chunks 100000]
        [--searches 50] [--vectors random|real] [--rescore 200,400,1000,2000] [--baseline] [--mmap-off]
        [--database-url postgresql+psycopg://...] [--pgvector N [--bulk]] [--words 120] [--block 1024]

Fills a database built by the real migrations (``jobs.db.upgrade``) with ``--chunks`` chunks of 384 dimensions
(all-minilm's width) and ``--words`` words each, drawn Zipf-wise from a generated word list, in documents of 100
chunks, each document inserted and indexed in its own transaction as the worker's apply does
(``jobs.collection_vectors.index_document``).  Their vectors are random unit vectors (``--vectors random``, the
worst case for sign bits: no two are alike), or real ones (``--vectors real``): paragraphs of this machine's
manual pages (``/usr/share/man/man{1,3,5,7,8}``, roff markup stripped, up to 80 words, 40 per page, gcloud's
thousands of near-identical pages left out) embedded by all-minilm through llama-cpp-python, cached in
``bench/.cache/``; ``REAL_QUERIES`` of them are held out as queries, the rest replicated to ``--chunks``, each
copy after the first moved by Gaussian noise of norm ``NOISE`` and renormalised.
Then, before each timed row, it waits for the 1-minute load average to fall under ``--quiet`` (every 30 s, 15
minutes at most over the whole run, then it measures anyway; each row shows the load it started at) and times
``--searches`` searches of each mode (hybrid, vector only, text only, and hybrid with a filter passing about
half the documents) and prints p50/p95.  ``--rescore`` also prints, for each count of candidates rescored from
float32, the sign-bit leg's recall@10 against the exact top 10 (numpy over every vector) and its own latency.
``--baseline`` also times the vector leg as a scan of ``collection_chunks`` itself (the exact scan);
``--mmap-off`` times hybrid and vector-only searches again without SQLite's memory map (jobs/db.py's pragma).
``--pgvector N`` does the same on a private PostgreSQL 16 with pgvector (``pgserver``) with N chunks (HNSW);
with ``--bulk`` it fills them by ``COPY`` and builds the HNSW index once after (:func:`fill_bulk`: at 20,000
chunks 21 s of copying and 42 s of index build at a load average of 10: a million was not run).
Goal: hybrid p50 under 50 ms at 100k chunks on SQLite; under 50 ms at 1M on PostgreSQL with HNSW.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import event, insert, text
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import model_path, print_table
from corral.settings import Settings
from harness.stack import drop_everything
from jobs import collection_search as cs
from jobs import collection_vectors as cv
from jobs.db import engine_for, upgrade
from jobs.models import Collection, CollectionChunk, CollectionDocument

DIMS = 384
PER_DOC = 100
DIGEST = "b" * 64
COLLECTION = "vs_bench"
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "qa", "di", "fo", "gu", "ho", "ji"]
CACHE = Path(__file__).resolve().parent / ".cache"
REAL_TEXTS = 12000
REAL_QUERIES = 200
NOISE = 0.05
MAN = Path("/usr/share/man")
MACRO_TEXT = re.compile(r"^\.(B|I|BI|BR|IB|IR|RB|RI|SM|SB)\s+(.*)$")
ESCAPE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*(\[[^\]]*\]|\(..|.)|\\\((..)|\\\[([^\]]*)\]|\\&|\\c")
QUIET_BUDGET_S = 900.0
_quiet_deadline: list[float] = []


def vocabulary(size: int = 20000) -> list[str]:
    rng = np.random.default_rng(7)
    words = {"".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))) for _ in range(size * 2)}
    return sorted(words)[:size]


# -- real vectors -----------------------------------------------------------------------------------------------


def roff_paragraphs(raw: str) -> list[str]:
    """A manual page's paragraphs as plain text: macro lines end a paragraph (the text of font macros is kept),
    escapes are dropped.  Crude, but what is left is the page's own English."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        m = MACRO_TEXT.match(line)
        if m:
            line = m.group(2).replace('"', "")
        elif line.startswith((".", "'")):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        line = ESCAPE.sub(" ", line).replace("\\-", "-").replace("\\e", "\\").replace("\\", "")
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def man_texts(count: int, seed: int = 37) -> list[str]:
    pages = sorted(p for d in ("man1", "man3", "man5", "man7", "man8") for p in (MAN / d).glob("*.gz")
                   if not p.is_symlink() and not p.name.startswith("gcloud"))
    random.Random(seed).shuffle(pages)
    seen: set[str] = set()
    out: list[str] = []
    for page in pages:
        try:
            raw = gzip.decompress(page.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        taken = 0
        for para in roff_paragraphs(raw):
            if taken >= 40:
                break
            words = para.split()
            for at in range(0, len(words), 80):
                piece = " ".join(words[at:at + 80])
                if len(words[at:at + 80]) >= 12 and piece not in seen:
                    seen.add(piece)
                    out.append(piece)
                    taken += 1
        if len(out) >= count:
            break
    return out[:count]


def real_embeddings(count: int = REAL_TEXTS) -> np.ndarray:
    """``count`` manual-page paragraphs embedded by all-minilm (L2-normalised), from the cache when there."""
    cached = CACHE / f"man-minilm-{count}.npy"
    if cached.exists():
        loaded: np.ndarray = np.load(cached)
        return loaded
    from llama_cpp import Llama

    texts = man_texts(count)
    llm = Llama(str(model_path(Path(tempfile.mkdtemp(prefix="corral-search-bench-")), "all-minilm:l6-v2")),
                embedding=True, n_ctx=512, n_batch=2048, n_ubatch=512, n_threads=2, n_threads_batch=2, verbose=False)
    out: list[Any] = []
    for i in range(0, len(texts), 64):
        out.extend(llm.embed(texts[i:i + 64], truncate=True))
        print(f"  embedded {len(out)} of {len(texts)}", file=sys.stderr)
    vectors = np.array(out, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    CACHE.mkdir(exist_ok=True)
    np.save(cached, vectors)
    return vectors


def corpus(kind: str, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunks' vectors and the query vectors, both L2-normalised."""
    rng = np.random.default_rng(0)
    if kind == "random":
        vectors = rng.standard_normal((chunks + REAL_QUERIES, DIMS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors[:chunks], vectors[chunks:]
    real = real_embeddings()
    order = rng.permutation(len(real))
    queries, base = real[order[:REAL_QUERIES]], real[order[REAL_QUERIES:]]
    copies = [base]
    while sum(len(c) for c in copies) < chunks:
        noise = rng.standard_normal(base.shape).astype(np.float32) * np.float32(NOISE / np.sqrt(DIMS))
        moved = base + noise
        copies.append(moved / np.linalg.norm(moved, axis=1, keepdims=True))
    return np.concatenate(copies)[:chunks], queries


# -- the database -----------------------------------------------------------------------------------------------


def fill(sessions: sessionmaker[Session], vectors: np.ndarray, words: int, collection: str = COLLECTION,
         digest: str | None = DIGEST) -> float:
    """Insert and index the chunks a document at a time into ``collection`` (made here, of ``digest``; None: the
    collection exists already, made through the API, and its chunks get its model's digest); returns the seconds
    it took."""
    vocab = np.array(vocabulary())
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    with sessions.begin() as session:
        if digest is None:
            digest = str(session.scalar(text("SELECT model_digest FROM collections WHERE id = :c"), {"c": collection}))
        else:
            session.add(Collection(id=collection, owner=None, name="bench", model="all-minilm", model_digest=digest,
                                   chunk_tokens=800, chunk_overlap=400, last_active_at=now, created_at=now))
    chunks = len(vectors)
    for first in range(0, chunks, PER_DOC):
        count = min(PER_DOC, chunks - first)
        terms = vocab[np.minimum(rng.zipf(1.2, size=(count, words)) - 1, len(vocab) - 1)]
        with sessions.begin() as session:
            doc = CollectionDocument(collection_id=collection, source_id=f"doc-{first // PER_DOC}",
                                     filename=f"doc-{first // PER_DOC}.md", usage_bytes=0,
                                     attributes={"half": (first // PER_DOC) % 2 == 0}, status="completed",
                                     chunk_tokens=800, chunk_overlap=400, chunk_count=count)
            session.add(doc)
            session.flush()
            session.execute(insert(CollectionChunk), [
                {"collection_id": collection, "document_id": doc.id, "model_digest": digest, "seq": n,
                 "text": " ".join(terms[n]), "start": 0, "end": 0, "tokens": words,
                 "embedding": vectors[first + n].tobytes()}
                for n in range(count)])
            cv.index_document(session, doc.id)
        if first and first % 20000 == 0:
            print(f"  {first} chunks, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return time.perf_counter() - started


def fill_bulk(url: str, vectors: np.ndarray, words: int) -> float:
    """PostgreSQL with pgvector (``--bulk``): the rows :func:`fill` writes, by ``COPY``, then the collection's
    HNSW index built once over them (jobs/collection_vectors.py ``hnsw_ddl``, the index an apply makes; row by
    row, a million chunks would take hours on 2 cores).  Returns the seconds it took, the build included."""
    vocab = np.array(vocabulary())
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    engine = engine_for(url)
    started = time.perf_counter()
    chunks, dims = vectors.shape
    with sessionmaker(engine).begin() as session:
        session.add(Collection(id=COLLECTION, owner=None, name="bench", model="all-minilm", model_digest=DIGEST,
                               chunk_tokens=800, chunk_overlap=400, last_active_at=now, created_at=now))
        session.flush()
        docs = list(session.scalars(insert(CollectionDocument).returning(CollectionDocument.id), [
            {"collection_id": COLLECTION, "source_id": f"doc-{d}", "filename": f"doc-{d}.md", "usage_bytes": 0,
             "attributes": {"half": d % 2 == 0}, "status": "completed", "chunk_tokens": 800, "chunk_overlap": 400,
             "chunk_count": min(PER_DOC, chunks - d * PER_DOC)} for d in range(-(-chunks // PER_DOC))]))
    raw = engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        with conn.cursor() as cur:
            with cur.copy('COPY collection_chunks (collection_id, document_id, model_digest, seq, text, start, "end", '
                          "tokens, embedding) FROM STDIN") as copy:
                for first in range(0, chunks, PER_DOC):
                    count = min(PER_DOC, chunks - first)
                    terms = vocab[np.minimum(rng.zipf(1.2, size=(count, words)) - 1, len(vocab) - 1)]
                    for n in range(count):
                        copy.write_row((COLLECTION, docs[first // PER_DOC], DIGEST, n, " ".join(terms[n]), 0, 0, words,
                                        vectors[first + n].tobytes()))
            print(f"  chunks copied, {time.perf_counter() - started:.0f} s", file=sys.stderr)
            cur.execute("SELECT id, document_id FROM collection_chunks WHERE collection_id = %s ORDER BY document_id, seq",
                        (COLLECTION,))
            ids = np.array(cur.fetchall(), dtype=np.int64)
            # COPY's binary rows: (chunk_id, collection_id, model_digest, document_id, embedding), each field its
            # length first; a pgvector value is its dimensions, a reserved 0, then big-endian float4s
            key = COLLECTION.encode()
            row = np.dtype([("fields", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("c", f"S{len(key)}"),
                            ("l3", ">i4"), ("m", "S64"), ("l4", ">i4"), ("doc", ">i8"), ("l5", ">i4"),
                            ("dims", ">i2"), ("unused", ">i2"), ("v", ">f4", (dims,))])
            with cur.copy(f"COPY {cv.VECTOR_TABLE} (chunk_id, collection_id, model_digest, document_id, embedding) "
                          "FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(b"PGCOPY\n\xff\r\n\0" + bytes(8))
                for first in range(0, chunks, 50_000):
                    part = np.zeros(min(50_000, chunks - first), dtype=row)
                    part["fields"], part["l1"], part["l2"], part["l3"], part["l4"] = 5, 8, len(key), 64, 8
                    part["l5"], part["dims"] = 4 + 4 * dims, dims
                    part["id"], part["doc"] = ids[first:first + len(part), 0], ids[first:first + len(part), 1]
                    part["c"], part["m"], part["v"] = key, DIGEST.encode(), vectors[first:first + len(part)]
                    copy.write(part.tobytes())
                copy.write(b"\xff\xff")
            print(f"  vectors copied, {time.perf_counter() - started:.0f} s", file=sys.stderr)
            cur.execute("SET maintenance_work_mem = '4GB'")
            cur.execute(cv.hnsw_ddl(COLLECTION, DIGEST, dims))
            cur.execute("ANALYZE")
        conn.commit()
    finally:
        raw.close()
    return time.perf_counter() - started


def load() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(limit: float) -> float:
    """Wait (checking every 30 s) until the 1-minute load average is under ``limit``, for at most
    ``QUIET_BUDGET_S`` over the whole run; returns the load measured at."""
    if not _quiet_deadline:
        _quiet_deadline.append(time.monotonic() + QUIET_BUDGET_S)
    while load() >= limit and time.monotonic() < _quiet_deadline[0]:
        print(f"  load {load():.2f} >= {limit}: waiting", file=sys.stderr)
        time.sleep(30)
    if load() >= limit:
        print(f"  load {load():.2f}: gave up waiting, measuring anyway", file=sys.stderr)
    return load()


def timed(fn: Callable[[], Any], runs: int, quiet: float) -> tuple[float, float, float]:
    """p50 and p95 ms of ``runs`` calls (after one to warm the caches), and the load they started at."""
    at = wait_for_quiet(quiet)
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))], at


def measure(label: str, url: str, args: argparse.Namespace) -> tuple[list[list[Any]], list[list[Any]]]:
    sessions = sessionmaker(engine_for(url), expire_on_commit=False)
    vectors, query_vectors = corpus(args.vectors, args.chunks if label != "pgvector" else args.pgvector)
    bulk = args.bulk and label == "pgvector"
    seconds = fill_bulk(url, vectors, args.words) if bulk else fill(sessions, vectors, args.words)
    with sessions() as session:
        layout = cv._layout(session)
        ids = np.array(list(session.scalars(text("SELECT id FROM collection_chunks ORDER BY id"))), dtype=np.int64)
    vocab = vocabulary()
    rng = np.random.default_rng(1)
    queries = [(query_vectors[i % len(query_vectors)], " ".join(rng.choice(vocab[50:2000], size=3)))
               for i in range(args.searches + 1)]
    cursor = iter(range(10**9))
    chunks = len(vectors)

    def one(**kw: Any) -> Callable[[], Any]:
        def go() -> Any:
            q, words_ = queries[next(cursor) % len(queries)]
            return cs.search(sessions, collection_id=COLLECTION, model_digest=DIGEST, query_vectors=[q],
                             query_texts=[words_], k=10, **{"filters": None, **kw})
        return go

    rows = []
    modes: list[tuple[str, dict[str, Any]]] = [
        ("hybrid", {}), ("vector only", {"text_weight": 0}), ("text only", {"embedding_weight": 0}),
        ("hybrid, filter ~50%", {"filters": {"key": "half", "type": "eq", "value": True}})]
    for mode, kw in modes:
        p50, p95, at = timed(one(**kw), args.searches, args.quiet)
        rows.append([label, layout, args.vectors, chunks, f"{seconds:.0f}", mode, p50, p95, f"{at:.1f}"])
    recall: list[list[Any]] = []
    if layout == "blocks" and args.rescore:
        exact = [set(ids[np.argsort(-(vectors @ q), kind="stable")[:10]].tolist()) for q in query_vectors]
        for count in [int(c) for c in args.rescore.split(",")]:
            found = [cv.blocks_legs(sessions, COLLECTION, DIGEST, [q], None, 10, rescore=count)[0] for q in query_vectors]
            hits = [len(truth & {c for c, _, _ in leg}) / 10 for truth, leg in zip(exact, found)]

            def leg(count: int = count) -> Any:
                q, _ = queries[next(cursor) % len(queries)]
                return cv.blocks_legs(sessions, COLLECTION, DIGEST, [q], None, 10, rescore=count)
            p50, p95, at = timed(leg, args.searches, args.quiet)
            recall.append([label, args.vectors, chunks, count, f"{statistics.mean(hits):.3f}", f"{min(hits):.1f}",
                           p50, p95, f"{at:.1f}"])
    if args.mmap_off and url.startswith("sqlite"):
        engine = engine_for(url)
        event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA mmap_size=0"))
        engine.dispose()  # new connections, without the memory map
        for mode, kw in modes[:2]:
            p50, p95, at = timed(one(**kw), args.searches, args.quiet)
            rows.append([label, f"{layout}, no mmap", args.vectors, chunks, "", mode, p50, p95, f"{at:.1f}"])
    if args.baseline:
        def rows_scan() -> Any:
            q, _ = queries[next(cursor) % len(queries)]
            return cv.chunks_legs(sessions, COLLECTION, DIGEST, [q], None, 50)
        p50, p95, at = timed(rows_scan, min(args.searches, 10), args.quiet)
        rows.append([label, "rows (baseline)", args.vectors, chunks, "", "vector leg only", p50, p95, f"{at:.1f}"])
    return rows, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--searches", type=int, default=50)
    parser.add_argument("--vectors", choices=["random", "real"], default="real")
    parser.add_argument("--rescore", default="", help="candidate counts whose recall@10 to measure, e.g. 400,1000")
    parser.add_argument("--database-url", help="a PostgreSQL of its own (emptied first) instead of SQLite")
    parser.add_argument("--pgvector", type=int, default=0, help="chunks on a private pgvector server (0: skip)")
    parser.add_argument("--bulk", action="store_true",
                        help="pgvector only: fill by COPY, then build the HNSW index once (for a million chunks)")
    parser.add_argument("--baseline", action="store_true", help="also time the exact scan of collection_chunks")
    parser.add_argument("--mmap-off", action="store_true", help="also time SQLite without its memory map")
    parser.add_argument("--block", type=int, default=cv.BLOCK, help="entries per block row")
    parser.add_argument("--quiet", type=float, default=2.5, help="the load average to wait for before timing")
    args = parser.parse_args()
    cv.BLOCK = args.block
    home = Path(tempfile.mkdtemp(prefix="corral-search-bench-"))
    rows: list[list[Any]] = []
    recall: list[list[Any]] = []
    if args.chunks:
        url = args.database_url or f"sqlite:///{home / 'bench.db'}"
        if args.database_url:
            drop_everything(engine_for(url))
        upgrade(Settings(home=home, database_url=url))
        more, found = measure("sqlite" if url.startswith("sqlite") else "postgresql", url, args)
        rows, recall = rows + more, recall + found
    if args.pgvector:
        import pgserver

        server = pgserver.get_server(home / "pgdata", cleanup_mode="stop")
        try:
            url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
            upgrade(Settings(home=home, database_url=url))
            more, found = measure("pgvector", url, args)
            rows, recall = rows + more, recall + found
            engine_for(url).dispose()
        finally:
            server.cleanup()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{os.cpu_count()} CPUs ({cpu}), block {cv.BLOCK}, rescore max({cv.RESCORE} * n, {cv.RESCORE_MIN})")
    print_table("Collection search latency (ms)", ["database", "vector layout", "vectors", "chunks", "fill s", "mode",
                                                    "p50 ms", "p95 ms", "load"], rows)
    if recall:
        print_table("Sign-bit leg: recall@10 against the exact scan, and its latency (k = 10)",
                    ["database", "vectors", "chunks", "rescored", "recall@10", "worst query", "p50 ms", "p95 ms",
                     "load"], recall)


if __name__ == "__main__":
    main()
