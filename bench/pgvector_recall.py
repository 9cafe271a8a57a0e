"""The pgvector leg's recall@10 and latency against ``hnsw.ef_search``, on real all-minilm vectors.

    env -u REDIS_URL .venv/bin/python -m bench.pgvector_recall [--chunks 20000] [--queries 100]

bench/collections_scale.py's 100k-chunk run on PostgreSQL (2026-12-07) found the HNSW leg's recall@10 against
the exact scan at 0.5 (worst query 0.0) with the search's ``ef_search`` of 40.  This bench finds the setting that
fixes it, without a 57-minute sync: it embeds ``--chunks`` chunks of ~100 tokens in this process (the same corpus
as collections_scale.py: sentences drawn with a fixed seed from the words of this machine's manual pages; the
packaged llama.cpp, the default model's F16 weights), loads them into a private PostgreSQL 16 with pgvector
(pgserver) under the partial HNSW index the collections build (jobs/collection_vectors.py ``hnsw_ddl``: cosine,
``HNSW_WITH``), and for ``--queries`` two-word queries prints, per ``ef_search``, the mean and worst
recall@10 against the exact top 10 (numpy over the same vectors) and the query's p50 and p95 latency;
``--graph M:EF_CONSTRUCTION`` adds row groups for other index settings.  The vectors are kept in bench/.cache.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.collections_scale import draw_text, vocabulary
from bench.common import model_path, print_table
from jobs.collection_vectors import HNSW_WITH, hnsw_ddl
from jobs.search import vector_literal

EF_SEARCH = (40, 100, 200, 400, 1000)


def chunk_texts(n: int, vocab: list[str], seed: int = 7, words: int = 43) -> list[str]:
    """``n`` chunks of about 100 WordPiece tokens (2.3 per word), in sentences of 8-20 words drawn as
    collections_scale.py draws them."""
    rng = random.Random(seed)
    return [draw_text(rng, words, vocab) for _ in range(n)]


def embed(texts: list[str], threads: int) -> np.ndarray:
    from workers.engine import LoadedModel, LoadSpec

    home = Path(tempfile.mkdtemp(prefix="corral-pgrecall-"))
    try:
        model = LoadedModel(LoadSpec(path=model_path(home, "all-minilm"), embedding=True, n_ctx=512, n_gpu_layers=0,
                                     n_threads=threads, pooling_mean=True))
        rows = model.embed_array(model.embed_tokens(texts, truncate=True))
        model.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


CACHE = Path(__file__).resolve().parent / ".cache"


def cached_vectors(texts: list[str], threads: int, key: str) -> np.ndarray:
    """:func:`embed`, kept in bench/.cache under ``key`` (the texts' count and seed): a rerun with other index
    settings skips the embedding, most of the bench's time."""
    path = CACHE / f"pgvector-recall-{key}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        if cached.shape[0] == len(texts):
            return cached
    vectors = embed(texts, threads)
    CACHE.mkdir(exist_ok=True)
    np.save(path, vectors)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--graph", action="append", default=[], metavar="M:EF_CONSTRUCTION",
                        help="also build the index with these HNSW settings (repeatable); the collections' own "
                             "index is always the first row group")
    args = parser.parse_args()
    import pgserver
    from sqlalchemy import create_engine, text

    vocab = vocabulary()
    rng = random.Random(11)
    queries = [f"{rng.choice(vocab)} {rng.choice(vocab)}" for _ in range(args.queries)]
    started = time.perf_counter()
    vectors = cached_vectors(chunk_texts(args.chunks, vocab) + queries, args.threads, f"{args.chunks}-{args.queries}")
    chunks, qs = vectors[: args.chunks], vectors[args.chunks:]
    print(f"embedded {len(vectors)} texts in {time.perf_counter() - started:.0f} s", flush=True)
    exact = [set(np.argsort(-(chunks @ q))[:10].tolist()) for q in qs]

    data = Path(tempfile.mkdtemp(prefix="corral-pgrecall-pg-"))
    data.chmod(0o755)
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        engine = create_engine(server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            conn.execute(text("CREATE TABLE collection_vectors (chunk_id bigint PRIMARY KEY, collection_id text, "
                              "model_digest text, document_id bigint, embedding vector)"))
            for start in range(0, len(chunks), 1000):
                conn.execute(text("INSERT INTO collection_vectors VALUES (:id, 'vs', 'm', :id, CAST(:v AS vector))"),
                             [{"id": i, "v": vector_literal(chunks[i])}
                              for i in range(start, min(start + 1000, len(chunks)))])
        table = []
        dims = chunks.shape[1]
        distance = f"embedding::vector({dims}) <=> CAST(:q AS vector({dims}))"
        query = text(f"SELECT chunk_id FROM collection_vectors WHERE collection_id = 'vs' AND model_digest = 'm' "
                     f"ORDER BY {distance} LIMIT 10")
        for graph in [None, *args.graph]:
            ddl = hnsw_ddl("vs", "m", dims)
            label = "collections' (" + HNSW_WITH + ")"
            if graph is not None:
                m, ef_construction = (int(x) for x in graph.split(":"))
                ddl = ddl.replace(HNSW_WITH, f"m = {m}, ef_construction = {ef_construction}", 1)
                label = f"{m}:{ef_construction}"
            with engine.begin() as conn:
                conn.execute(text("DROP INDEX IF EXISTS " + ddl.split(" ON ")[0].split()[-1]))
                built = time.perf_counter()
                conn.execute(text(ddl))
                took = time.perf_counter() - built
            print(f"HNSW {label} over {len(chunks)} rows built in {took:.0f} s", flush=True)
            for ef in EF_SEARCH:
                recalls, times = [], []
                with engine.begin() as conn:
                    conn.execute(text(f"SET LOCAL hnsw.ef_search = {ef}"))
                    plan = "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + str(query)),
                                                                {"q": vector_literal(qs[0])}))
                    for q, truth in zip(qs, exact):
                        t = time.perf_counter()
                        got = {int(i) for i in conn.scalars(query, {"q": vector_literal(q)})}
                        times.append((time.perf_counter() - t) * 1000)
                        recalls.append(len(got & truth) / 10)
                times.sort()
                table.append([label, f"{took:.0f}", ef, "hnsw" if "hnsw" in plan else "no index",
                              f"{statistics.mean(recalls):.3f}", f"{min(recalls):.1f}", statistics.median(times),
                              times[int(0.95 * (len(times) - 1))]])
        engine.dispose()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)
    print_table(f"pgvector HNSW recall@10 against the exact scan, {len(chunks)} chunks, {len(qs)} two-word queries",
                ["m:ef_construction", "build s", "ef_search", "plan", "recall@10 mean", "worst query", "p50 ms",
                 "p95 ms"], table)


if __name__ == "__main__":
    main()
