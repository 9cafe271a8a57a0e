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

Measured on this project's 2-core VM (AMD EPYC, AVX2, quiet), ``--chunks 3000`` (375 documents of 600 words,
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_redis, model_path, print_table
from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, fresh_database

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


def write_corpus(root: Path, documents: int, words: int, vocab: list[str], seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for n in range(documents):
        sentences = []
        left = words
        while left > 0:
            size = min(left, rng.randint(8, 20))
            sentences.append(" ".join(rng.choice(vocab) for _ in range(size)).capitalize() + ".")
            left -= size
        path = root / f"part{n // 1000:03}" / f"doc{n:06}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(sentences))
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
    parser.add_argument("--words", type=int, default=600, help="words per document (~8 chunks of 100 tokens)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--database-url", help="a PostgreSQL to use (emptied first); default SQLite")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="corral-collections-scale-"))
    model_path(home, "all-minilm:l6-v2")
    vocab = vocabulary()
    per_doc = max(1, round(args.words * 1.3 / 98))
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
            chunks = _chunk_count(settings, store["id"])
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
    ])


def _chunk_count(settings: Settings, store_id: str) -> int:
    from sqlalchemy import func, select

    from jobs.db import sessions
    from jobs.models import CollectionChunk

    with sessions(settings)() as session:
        return int(session.scalar(select(func.count()).select_from(CollectionChunk)
                                  .where(CollectionChunk.collection_id == store_id)) or 0)


if __name__ == "__main__":
    main()
