"""Collections at scale: the first sync of a folder, a re-sync with 1% of its documents changed, hybrid search
latency through the API, and the API's memory, on a real stack.

    env -u REDIS_URL .venv/bin/python -m bench.collections_scale [--chunks 20000] [--database-url URL]

The folder is written here: documents of about ``--words`` words of English (sentences drawn, with a fixed seed,
from the words of this machine's own manual pages), chunked statically at 100 tokens with no overlap so that the
chunk count is close to ``--chunks``.  ``corral collection sync`` runs it as a user would (hash every file, upload
the new ones, one index job, ``--wait``); then 1% of the documents get a new sentence and the sync runs again.
The re-sync's cost is its wall time over the first's (issue #37's goal: at most 3%).  Then ``--queries``
hybrid searches (two words each, drawn from the corpus) go through ``POST /v1/vector_stores/{id}/search``, and
the API's resident memory (its gunicorn processes together) is read before the collection exists and after the
searches (the goal: flat in the collection's size).  SQLite in the bench's home unless ``--database-url`` names a
PostgreSQL (emptied first).

``--pgserver`` runs it on a private PostgreSQL 16 with pgvector (HNSW).  Last, ``--recall-queries`` two-word
queries check the vector leg's recall@10 against the exact scan of every chunk's vector.

Measured 2026-12-07 (Zen 4 VM, quiet), ``--chunks 100000``: 7,142 documents, 99,430 chunks; first sync 2,302.5 s,
re-sync 25.3 s (1.1%), hybrid p50 43.9 ms, p95 56.3 ms, API VmRSS 217 -> 514 MiB (the mapped database included).
Earlier, with a chunk estimate that was too low (it made 375 documents for 3,000 chunks),
measured on this project's 2-core VM (AMD EPYC, AVX2, quiet), ``--chunks 3000`` (375 documents of 600 words,
5,223 chunks of at most 100 tokens: the chunk estimate is low for this vocabulary), SQLite: first sync 158.0 s,
re-sync with 1% changed 3.4 s (2.1% of the first; goal at most 3%), hybrid search through the API p50 46.1 ms,
p95 65.4 ms (the query's embedding on the worker included), API RSS 218 MiB before the collection, 255 MiB after.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_redis, model_path, print_table
from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, fresh_database
from jobs.db import engine_for

WORD = re.compile(r"[A-Za-z][a-z]{2,14}")


def vocabulary(limit: int = 20_000) -> list[str]:
    """Words of the machine's English manual pages (real text, nobody's on this project), most pages first."""
    words: dict[str, None] = {}
    for path in sorted(Path("/usr/share/man/man1").glob("*.gz"))[:3000]:
        try:
            raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="ignore")
        except (OSError, EOFError):
            continue
        for word in WORD.findall(raw):
            words.setdefault(word.lower(), None)
        if len(words) >= limit:
            break
    return list(words) or ["corral", "collection", "search", "vector", "text"]


def draw_text(rng: random.Random, words: int, vocab: list[str]) -> str:
    """``words`` words of ``vocab`` in sentences of 8-20 words (bench/pgvector_recall.py draws its chunks so too)."""
    sentences = []
    left = words
    while left > 0:
        size = min(left, rng.randint(8, 20))
        sentences.append(" ".join(rng.choice(vocab) for _ in range(size)).capitalize() + ".")
        left -= size
    return " ".join(sentences)


def write_corpus(root: Path, documents: int, words: int, vocab: list[str], seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for n in range(documents):
        path = root / f"part{n // 1000:03}" / f"doc{n:06}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(draw_text(rng, words, vocab))
        paths.append(path)
    return paths


def api_rss_kib(stack: Stack, field: str = "VmRSS") -> int:
    """Resident memory of the API server: its gunicorn master and workers together.  ``field``: a line of
    /proc/<pid>/status, ``VmRSS`` (all), ``RssAnon`` (its own heap and stacks) or ``RssFile`` (mapped files:
    SQLite's memory-mapped database among them, pages the kernel can drop and other processes share)."""
    api = next(p for p in stack.procs if "serve" in " ".join(map(str, p.proc.args)))
    pids, total = [api.proc.pid], 0
    while pids:
        pid = pids.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(rf"{field}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, AttributeError):
            continue
    return total


def corral(settings: Settings, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args, "--host", settings.host], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"corral {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return time.perf_counter() - started, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20_000, help="about how many chunks the collection gets")
    parser.add_argument("--words", type=int, default=600, help="words per document (~14 chunks of 100 tokens)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--recall-queries", type=int, default=100,
                        help="two-word queries whose vector leg is checked against the exact scan")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--database-url", help="a PostgreSQL to use (emptied first); default SQLite")
    where.add_argument("--pgserver", action="store_true",
                       help="a private PostgreSQL 16 with pgvector (pgserver, the test extra): the HNSW layout")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.pgserver:
            import pgserver

            data = Path(tempfile.mkdtemp(prefix="corral-scale-pg-"))
            stack.callback(shutil.rmtree, data, ignore_errors=True)  # after the server has stopped
            server = pgserver.get_server(data, cleanup_mode="stop")
            stack.callback(server.cleanup)
            args.database_url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
        run(args)


def run(args: argparse.Namespace) -> None:

    home = Path(tempfile.mkdtemp(prefix="corral-collections-scale-"))
    model_path(home, "all-minilm:l6-v2")
    vocab = vocabulary()
    # all-minilm's WordPiece cuts this vocabulary's words (rarer than prose's) into ~2.3 tokens each: 600 words
    # made 13.9 chunks of 100 tokens (5,220 for 375 documents)
    per_doc = max(1, round(args.words * 2.3 / 100))
    documents = max(1, args.chunks // per_doc)
    folder = home / "corpus"
    paths = write_corpus(folder, documents, args.words, vocab)
    with bench_redis(home) as redis_url:
        settings = Settings(home=home, redis_url=redis_url, models_dir=home / "models", host=f"127.0.0.1:{free_port()}",
                            database_url=args.database_url or f"sqlite:///{home / 'bench.db'}")
        fresh_database(settings)
        with Stack(settings, home / "logs").running() as stack:
            base = stack.base_url
            with httpx.Client(base_url=base, timeout=120) as client:
                client.post("/v1/vector_stores", json={"name": "warm", "model": "all-minilm"})  # load paths once
                rss_before = api_rss_kib(stack)
                corral(settings, "collection", "create", "scale", "--model", "all-minilm", "--chunk-tokens", "100",
                       "--overlap", "0")
                first, _ = corral(settings, "collection", "sync", "scale", str(folder), "--wait")
                store = next(s for s in client.get("/v1/vector_stores", params={"limit": 100}).json()["data"]
                             if s["name"] == "scale")
                changed = random.Random(11).sample(paths, max(1, len(paths) // 100))
                for path in changed:
                    path.write_text(path.read_text() + " A sentence added for the re-sync.")
                second, report = corral(settings, "collection", "sync", "scale", str(folder), "--wait")
                rng = random.Random(5)
                latencies = []
                for _ in range(args.queries):
                    query = f"{rng.choice(vocab)} {rng.choice(vocab)}"
                    started = time.perf_counter()
                    r = client.post(f"/v1/vector_stores/{store['id']}/search",
                                    json={"query": query, "max_num_results": 10})
                    latencies.append((time.perf_counter() - started) * 1000)
                    r.raise_for_status()
                rss_after = api_rss_kib(stack)
                files = client.get(f"/v1/vector_stores/{store['id']}").json()
                rng = random.Random(6)
                texts = [f"{rng.choice(vocab)} {rng.choice(vocab)}" for _ in range(args.recall_queries)]
                embedded = client.post("/api/embed", json={"model": "all-minilm", "input": texts})
                embedded.raise_for_status()
            chunks = _chunk_count(settings, store["id"])
            recall, layout = _vector_recall(settings, store["id"], embedded.json()["embeddings"])
            engine_for(settings.database).dispose()  # before a private PostgreSQL stops
    latencies.sort()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{cpu}, {os.cpu_count()} cores; {settings.database.split('@')[-1].split('?')[0]}")
    print(f"{files['file_counts']['completed']} documents, {chunks} chunks; re-sync: {report.strip().splitlines()[0]}")
    print_table("collection at scale", ["measure", "value"], [
        ["first sync (s)", first],
        ["re-sync, 1% changed (s)", second],
        ["re-sync / first (%)", 100 * second / first],
        ["hybrid search p50 (ms)", statistics.median(latencies)],
        ["hybrid search p95 (ms)", latencies[int(0.95 * (len(latencies) - 1))]],
        ["API RSS before (MiB)", rss_before / 1024],
        ["API RSS after (MiB)", rss_after / 1024],
        [f"vector leg ({layout}) recall@10 against the exact scan, mean", f"{statistics.mean(recall):.3f}"],
        [f"vector leg ({layout}) recall@10, worst query", f"{min(recall):.1f}"],
    ])


def _vector_recall(settings: Settings, store_id: str, queries: list[list[float]]) -> tuple[list[float], str]:
    """Each query's recall@10 of the collection's vector leg (sign-bit blocks on SQLite, HNSW with pgvector)
    against the exact scan of every chunk's float32 vector, and the leg's layout."""
    import numpy as np
    from sqlalchemy import text

    from jobs import collection_vectors as cv
    from jobs.db import sessions

    factory = sessions(settings)
    with factory() as session:
        digest = session.scalar(text("SELECT model_digest FROM collection_chunks WHERE collection_id = :c LIMIT 1"),
                                {"c": store_id})
        layout = cv._layout(session) or "rows"
    vectors = [np.asarray(q, dtype=np.float32) for q in queries]
    exact = cv.chunks_legs(factory, store_id, digest, [cv._normalized(q) for q in vectors], None, 10)
    found = cv.vector_legs(factory, store_id, digest, vectors, None, 10)
    return [len({c for c, _, _ in truth} & {c for c, _, _ in leg}) / max(1, len(truth))
            for truth, leg in zip(exact, found)], layout


def _chunk_count(settings: Settings, store_id: str) -> int:
    from sqlalchemy import func, select

    from jobs.db import sessions
    from jobs.models import CollectionChunk

    with sessions(settings)() as session:
        return int(session.scalar(select(func.count()).select_from(CollectionChunk)
                                  .where(CollectionChunk.collection_id == store_id)) or 0)


if __name__ == "__main__":
    main()
