"""Retrieval quality of a collection (issue #37 item 5): known-item search over this machine's manual pages.

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.collections_quality [--pages 400] [--seed 37]
        [--weights 1:1,2:1,1:2] [--reranker GGUF_OR_MODEL] [--queries N] [--home DIR] [--database-url URL]

The retrieval set is real text nobody on this project wrote: English manual pages of sections 1 and 8
(``/usr/share/man/man1``, ``man8``; not ``/usr/share/man/<lang>/``), rendered by ``man --nh --nj -P cat -l`` at
``MANWIDTH=80`` (no hyphenation, so a word is not cut in two at a line's end).  Each page gives one query, its
NAME line's one-line summary (the text after ``\\-``), and one document, the rest of the page without its NAME
section (so the query is not in its document verbatim) or its running header and footer.  ``--pages`` pages are
drawn with a fixed seed from those files that are not links, skipping a page whose summary is under 4 words,
whose body is under 200 characters, or whose summary another drawn page has too (its answer would be ambiguous),
and taking at most 5% of the pages from one Debian package (dpkg's file lists): google-cloud-cli ships 16,631 of
the 17,970 pages in man1, generated from one template, and would otherwise be nine pages in ten.
The set is cached in ``bench/.cache/`` (the machine's pages do not change between runs).

The pages go into one collection on a real stack (API server and worker in a temporary home, a private Redis,
SQLite): one File per page named ``<page>.txt`` (``POST /v1/files``), file batches of 100, the default model
(all-minilm) and chunking (``auto``: 800 tokens cut to the model's 512, 256 shared).  Then every query is searched
once in each mode, the modes interleaved query by query (so the VM's drift hits them alike), with
``max_num_results`` 50 through ``POST /v1/vector_stores/{id}/search``:

- vector: ``hybrid_search`` weights (1, 0); text: (0, 1) (SQLite FTS5 bm25, terms OR-ed); hybrid: (1, 1), weighted
  reciprocal rank fusion (``jobs/collection_search.py``), and each extra ``--weights`` pair as its own row;
- hybrid + rerank, when ``--reranker`` names a cross-encoder GGUF file or a model of the local store
  (``~/.corral/models``): loaded into the bench's stack and named as ``ranking_options.ranker``.

A hit is any chunk of the query's page.  The 50 chunks are deduplicated by page (a page ranks where its first
chunk does among the distinct pages), and the bench prints recall@10 and MRR@10 over the pages, the share of
queries whose page is among the first 10 *chunks* (what a client asking for 10 results sees), and the p50 of the
search's wall time as the client sees it (HTTP, the query's embedding on the worker, both legs, fusion).

Measured 2026-12-02 on this project's 2-core VM (AMD EPYC), shared with other engineers' test runs (load average
7-11 while indexing, 11.4 before the searches), ``--pages 100 --weights 1:1,2:1,1:2``: 100 pages of 53 packages,
7,573 characters a page on average (median 3,989); indexing took 1,174 s (the load; 400 pages did not fit the
session), the 500 searches 72 s.

    | mode            | recall@10 | MRR@10 | page in first 10 chunks | p50 ms | p95 ms |
    |-----------------|-----------|--------|-------------------------|--------|--------|
    | vector (1:0)    |     0.980 |  0.905 |                   0.960 |   62.3 | 1121.0 |
    | text (0:1)      |     0.990 |  0.919 |                   0.970 |   27.6 |   38.9 |
    | hybrid (1:1)    |     0.990 |  0.943 |                   0.990 |   62.2 | 1085.6 |
    | hybrid (2:1)    |     0.990 |  0.934 |                   0.990 |   66.2 | 1146.1 |
    | hybrid (1:2)    |     0.990 |  0.947 |                   0.990 |   70.9 | 1106.9 |
    | hybrid + rerank |       n/a |    n/a |                     n/a |    n/a |    n/a |

Hybrid (1:1, the default) has the best MRR@10 and ties text on recall@10; at 100 queries one query is 0.01, so the
weights' rows are not told apart (they were run beside 1:1 from the start, not chosen after it).

No cross-encoder's weights can be had offline (bench/README.md says which packages were looked at), so the
rerank row's model is trained here: ``bench/cross_encoder_train.py`` writes ``bench/.cache/cross-encoder.gguf``
(all-MiniLM-L6-v2 fine-tuned on the pages of sections 3, 5 and 7, none of which this set draws on).  Measured
2026-12-07 on the Zen 4 VM, quiet, ``--pages 100 --reranker bench/.cache/cross-encoder.gguf`` (that machine's
pages: a different set from the table above): vector 0.888, text 0.870, hybrid 0.945, hybrid + rerank 0.753
MRR@10, the rerank at 15 s p50 for its 100 candidates.  That small reranker orders worse than the fusion it
rescores; the stage ran a real network end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table

MAN_DIRS = (Path("/usr/share/man/man1"), Path("/usr/share/man/man8"))
CACHE = Path(__file__).resolve().parent / ".cache"
MIN_WORDS, MIN_BODY = 4, 200
RESULTS = 50  # chunks asked for per search (the API's most)
CUTOFF = 10
BATCH = 100  # files per file batch
PACKAGE_SHARE = 0.05  # no Debian package gives more than this share of the pages (google-cloud-cli has 16,631)
RERANKER = "bench-reranker"
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'-]*$")  # a section heading: unindented capitals
DASH = re.compile(r"\s[-\u2212\u2010\u2013\u2014]\s")  # what \- (or \(em) renders as between names and summary


@dataclass(frozen=True)
class Page:
    page: str  # the file's name without .gz: "ls.1"
    query: str  # the NAME line's summary
    body: str  # the rest of the page


# -- the retrieval set ---------------------------------------------------------------------------------------


def render(path: Path) -> str | None:
    """The page as plain text, 80 columns, unhyphenated and unjustified; None when man cannot render it."""
    env = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env.pop("MAN_KEEP_FORMATTING", None)
    try:
        done = subprocess.run(["man", "--nh", "--nj", "-P", "cat", "-l", str(path)], capture_output=True, env=env,
                              timeout=30, cwd=path.parent.parent)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return re.sub(r".\x08", "", done.stdout.decode("utf-8", "replace"))  # any overstrike left: bold, underline


def split_page(text: str) -> tuple[str, str] | None:
    """(summary, body) of a rendered page: the NAME section's text after its dash, and the lines after that
    section but the running footer ("GNU coreutils 9.1  2022-09  LS(1)")."""
    lines = text.rstrip().splitlines()[:-1]
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "NAME" and not line.startswith(" "))
    except StopIteration:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and HEADING.match(lines[i])), len(lines))
    name = " ".join(" ".join(lines[start + 1 : end]).split())
    parts = DASH.split(name, maxsplit=1)
    if len(parts) != 2:
        return None
    summary = parts[1].strip()
    body = "\n".join(lines[end:]).strip()  # before NAME: only the header (a long title wraps onto two lines)
    return summary, body


def known_item(text: str | None, seen: set[str]) -> tuple[str, str] | None:
    """(summary, body) of a rendered page that makes a known item: a summary of at least :data:`MIN_WORDS` words
    that no page in ``seen`` (summaries, lowercased) has, and a body of at least :data:`MIN_BODY` characters;
    its summary is then added to ``seen``.  None for any other page."""
    parsed = split_page(text) if text else None
    if parsed is None:
        return None
    summary, body = parsed
    key = " ".join(summary.lower().split())
    if len(summary.split()) < MIN_WORDS or len(body) < MIN_BODY or key in seen:
        return None
    seen.add(key)
    return summary, body


def candidates() -> list[Path]:
    files = {p.resolve(): p for d in MAN_DIRS if d.is_dir() for p in sorted(d.iterdir())
             if p.is_file() and not p.is_symlink()}
    return sorted(files.values())


def owners() -> dict[str, str]:
    """Each manual page's Debian package, from dpkg's file lists (``dpkg -S`` per file is far slower)."""
    out: dict[str, str] = {}
    for listing in Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            if line.startswith(tuple(f"{d}/" for d in MAN_DIRS)):
                out[line] = package
    return out


def page_name(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def build_set(pages: int, seed: int) -> list[Page]:
    """``pages`` pages drawn with ``seed`` (see the module docstring), from the cache when it has them."""
    files = candidates()
    digest = hashlib.sha256("\n".join(str(p) for p in files).encode()).hexdigest()[:12]
    cached = CACHE / f"manpages-{pages}-{seed}-{digest}.json"
    if cached.exists():
        return [Page(**row) for row in json.loads(cached.read_text())]
    order = files[:]
    random.Random(seed).shuffle(order)
    package = owners()
    cap = max(1, round(PACKAGE_SHARE * pages))
    kept: Counter[str] = Counter()
    chosen: list[Page] = []
    summaries: set[str] = set()
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        while order and len(chosen) < pages:
            drawn: list[Path] = []
            while order and len(drawn) < 32:  # a package at its cap is not rendered at all
                path = order.pop(0)
                if kept[package.get(str(path), path.name)] < cap:
                    drawn.append(path)
            for path, text in zip(drawn, pool.map(render, drawn)):
                owner = package.get(str(path), path.name)
                parsed = known_item(text, summaries) if kept[owner] < cap else None
                if parsed is None:
                    continue
                summary, body = parsed
                kept[owner] += 1
                chosen.append(Page(page_name(path), summary, body))
                if len(chosen) == pages:
                    break
    print(f"built {len(chosen)} pages of {len(kept)} packages from {len(files)} files in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([asdict(p) for p in chosen]))
    return chosen


# -- loading ---------------------------------------------------------------------------------------------------


def load(client: Any, pages: list[Page], name: str) -> tuple[str, dict[str, Any]]:
    """The collection ``name`` holding ``pages`` (reused when a kept ``--home`` has it complete), and how its
    loading went."""
    for store in client.vector_stores.list(limit=100):
        if store.name == name and store.file_counts.completed == len(pages):
            return store.id, {"reused": True}
    store = client.vector_stores.create(name=name, extra_body={"model": "all-minilm"})
    started = time.perf_counter()
    ids = [client.files.create(file=(f"{p.page}.txt", p.body.encode()), purpose="assistants").id for p in pages]
    uploaded = time.perf_counter()
    batches = [client.vector_stores.file_batches.create(store.id, file_ids=ids[i : i + BATCH]).id
               for i in range(0, len(ids), BATCH)]
    counts: dict[str, int] = {}
    while True:
        counts = {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0}
        for batch in batches:
            got = client.vector_stores.file_batches.retrieve(batch, vector_store_id=store.id).file_counts
            for key in counts:
                counts[key] += getattr(got, key)
        if counts["in_progress"] == 0:
            break
        print(f"  indexing: {counts} after {time.perf_counter() - uploaded:.0f} s", flush=True)
        time.sleep(10)
    indexed = time.perf_counter()
    if counts["failed"]:
        for f in client.vector_stores.files.list(store.id, filter="failed", limit=100):
            print(f"  failed: {f.id} {f.last_error}")
    return store.id, {"upload_s": uploaded - started, "index_s": indexed - uploaded, **counts}


def add_reranker(http: httpx.Client, spec: str) -> str:
    """Load a cross-encoder GGUF (a path, or a model of the local store) into the bench's stack as
    :data:`RERANKER`."""
    path = Path(spec)
    if not path.is_file():
        from corral.modelstore.store import ModelStore
        from corral.settings import Settings

        store = ModelStore(Settings().models_path)
        path = store.blob_path(store.get(spec).model_digest)
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    http.post(f"/api/blobs/{digest}", content=data).raise_for_status()
    created = http.post("/api/create", json={"model": RERANKER, "files": {"reranker.gguf": digest}, "stream": False})
    assert created.status_code == 200, created.text
    return RERANKER


# -- searching and scoring -------------------------------------------------------------------------------------


@dataclass
class Mode:
    label: str
    embedding_weight: float
    text_weight: float
    ranker: str = "none"

    def body(self, query: str) -> dict[str, Any]:
        return {"query": query, "max_num_results": RESULTS, "ranking_options": {
            "ranker": self.ranker,
            "hybrid_search": {"embedding_weight": self.embedding_weight, "text_weight": self.text_weight}}}


@dataclass
class Tally:
    ranks: list[int | None]  # the query's page among distinct pages, 1-based; None when not in the 50 chunks
    chunk_hits: list[bool]  # the page among the first 10 chunks
    seconds: list[float]

    def row(self, label: str) -> list[Any]:
        n = len(self.ranks)
        recall = sum(1 for r in self.ranks if r is not None and r <= CUTOFF) / n
        mrr = sum(1 / r for r in self.ranks if r is not None and r <= CUTOFF) / n
        return [label, f"{recall:.3f}", f"{mrr:.3f}", f"{sum(self.chunk_hits) / n:.3f}",
                statistics.median(self.seconds) * 1000, sorted(self.seconds)[int(0.95 * (n - 1))] * 1000]


def page_rank(data: list[dict[str, Any]], page: str) -> tuple[int | None, bool]:
    seen: list[str] = []
    for hit in data:
        name = hit["filename"].removesuffix(".txt")
        if name not in seen:
            seen.append(name)
    rank = seen.index(page) + 1 if page in seen else None
    in_chunks = any(hit["filename"] == f"{page}.txt" for hit in data[:CUTOFF])
    return rank, in_chunks


def evaluate(http: httpx.Client, store_id: str, pages: list[Page], modes: list[Mode]) -> dict[str, Tally]:
    tallies = {m.label: Tally([], [], []) for m in modes}
    for mode in modes:  # warm: the embedding model (and a reranker) loaded on the worker
        http.post(f"/v1/vector_stores/{store_id}/search", json=mode.body(pages[0].query)).raise_for_status()
    started = time.perf_counter()
    for n, page in enumerate(pages, 1):
        for mode in modes:
            t0 = time.perf_counter()
            r = http.post(f"/v1/vector_stores/{store_id}/search", json=mode.body(page.query))
            elapsed = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            rank, in_chunks = page_rank(r.json()["data"], page.page)
            tally = tallies[mode.label]
            tally.ranks.append(rank)
            tally.chunk_hits.append(in_chunks)
            tally.seconds.append(elapsed)
        if n % 100 == 0:
            print(f"  searched {n} queries x {len(modes)} modes in {time.perf_counter() - started:.0f} s", flush=True)
    return tallies


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@contextmanager
def bench_home(kept: str | None) -> Iterator[Path]:
    """``--home`` kept for a rerun (its collection is reused), else a temporary home removed at the end."""
    if kept:
        path = Path(kept)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="corral-quality-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse_weights(value: str) -> list[tuple[float, float]]:
    out = []
    for pair in value.split(","):
        e, t = pair.split(":")
        out.append((float(e), float(t)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pages", type=int, default=400)
    parser.add_argument("--seed", type=int, default=37)
    parser.add_argument("--weights", default="1:1", help="hybrid rows, embedding:text weight pairs (1:1 first)")
    parser.add_argument("--reranker", help="a cross-encoder GGUF file or a model of the local store")
    parser.add_argument("--home", help="a home kept between runs (its collection is reused)")
    parser.add_argument("--queries", type=int, help="search only the first N pages' queries (a reranker is slow)")
    parser.add_argument("--database-url", help="the stack's database (PostgreSQL: full text instead of FTS5); "
                        "kept with --home, so a second run searches the same collection")
    args = parser.parse_args()
    pages = build_set(args.pages, args.seed)
    body_chars = sum(len(p.body) for p in pages)
    print(f"{len(pages)} pages, {body_chars / len(pages):.0f} characters a page on average "
          f"(median {statistics.median(len(p.body) for p in pages):.0f})", flush=True)
    modes = [Mode("vector (1:0)", 1, 0), Mode("text (0:1)", 0, 1)]
    modes += [Mode(f"hybrid ({e:g}:{t:g})", e, t) for e, t in parse_weights(args.weights)]
    from openai import OpenAI

    load_avg = os.getloadavg()[0]
    with bench_home(args.home) as home:
        model_path(home, "all-minilm")
        database = {"database_url": args.database_url} if args.database_url else {}
        with corral_stack(home, **database) as stack, httpx.Client(base_url=stack.base_url, timeout=600) as http:
            client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0)
            if args.reranker:
                e, t = parse_weights(args.weights)[0]
                modes.append(Mode(f"hybrid ({e:g}:{t:g}) + rerank", e, t, add_reranker(http, args.reranker)))
            store_id, loading = load(client, pages, f"manpages-{len(pages)}-{args.seed}")
            store = http.get(f"/v1/vector_stores/{store_id}").json()
            print(f"collection {store_id}: {loading}; {store.get('file_counts')}", flush=True)
            tallies = evaluate(http, store_id, pages[: args.queries or len(pages)], modes)
    rows = [tallies[m.label].row(m.label) for m in modes]
    if not args.reranker:
        rows.append(["hybrid + rerank", "n/a", "n/a", "n/a", "n/a", "n/a"])
    searched = f", the first {args.queries} searched" if args.queries else ""
    print_table(
        f"Known-item search, {len(pages)} manual pages{searched} (seed {args.seed}), all-minilm, auto chunking, "
        f"{RESULTS} chunks a search deduplicated by page; {cpu_model()}, {os.cpu_count()} CPUs, "
        f"load average {load_avg:.1f} before",
        ["mode", f"recall@{CUTOFF}", f"MRR@{CUTOFF}", f"page in first {CUTOFF} chunks", "p50 ms", "p95 ms"], rows)
    if not args.reranker:
        print("\n(hybrid + rerank: no --reranker given; bench/cross_encoder_train.py makes one offline)")


if __name__ == "__main__":
    main()
