"""Reranking throughput: corral against a plain in-process llama-cpp-python loop over the same pairs.

    .venv/bin/python -m bench.rerank [--pairs 1000] [--tokens 100] [--threads N] [--skip-stack]

No reranker GGUF can be had offline, so the bench writes one: a BERT cross-encoder with random (seeded) weights of
a realistic size (6 layers, 384 wide, 12 heads, f16 matrices, a WordPiece vocabulary of ~28,000 made-up words:
the shape of ms-marco-MiniLM-L-6-v2), laid out as llama.cpp's converter writes ``BertForSequenceClassification``
(harness/cross_encoder.py, the test fixture's writer).  Random weights
score nonsense, at the speed of real ones.  Then, for ``--pairs`` (query, document of about ``--tokens``
tokens) pairs, it measures pairs/s through

1. a plain llama-cpp-python loop, one pair per decode, as llama.cpp's own recipe (rank pooling, the pair's
   tokens, ``llama_get_embeddings_seq``): the baseline;
2. corral's scorer in this process (workers/rerank.py: pairs built, packed many per decode): the raw packed
   decode;
3. ``POST /v1/rerank`` on a real API server and worker (Redis from REDIS_URL or a private one; SQLite), the
   documents in requests of up to 1,000;
4. a ``rerank`` job of the same pairs, 100 documents a line, timed from the upload to the job's end;

and prints each row's pairs per wall second and per CPU second (this process's, and the stack's processes'), with
their ratios to the loop and to the raw packed decode, and the load average after each row: on a machine shared
with other work the wall rate of a row falls with it, its CPU rate much less.

Measured on this project's 2-core VM (load average 0.6 before; 2 threads): loop 28.5 pairs/s, raw packed 30.1,
/v1/rerank 29.1 (0.97x the raw packed decode), job 28.5 (0.95x).  A CPU computes a 100-token pair at full speed
alone, so packing gains it nothing over the loop (workers/rerank.py CPU_PACK_TOKENS); what packing buys, many
pairs in one decode, is a GPU's to show.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, print_table, wait_for_job
from harness.cross_encoder import cross_encoder
from workers import compute

SYLLABLES = "ka lo mi ne ru sa te vo zi pa re do fu gi ha ji ku la mo nu po qi ro su ti va wo xe yu ze".split()
WORDS = ["".join(p) for n in (2, 3) for p in itertools.product(SYLLABLES, repeat=n)]  # 27,900 one-token words
QUERY = "kalomi nerusa tevozi paredo fugiha"
BENCH_MODEL = "bench-reranker"


def write_reranker(target: Path) -> Path:
    """The bench's cross-encoder GGUF: ms-marco-MiniLM-L-6-v2's shape, f16 matrices, :data:`WORDS` as its
    vocabulary (see the module docstring)."""
    return cross_encoder(target, n_embd=384, n_ff=1536, n_layer=6, n_head=12, n_ctx=512, words=WORDS, f16=True)


def documents(n: int, tokens: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(tokens)) + "." for _ in range(n)]


class Clock:
    """Pairs per wall second, and per CPU second of this process and of ``pids`` (a stack's processes, with their
    children): the second stays meaningful on a machine shared with other work, which slows the first."""

    def __init__(self, pairs: int, pids: list[int] | None = None) -> None:
        self.pairs, self.pids = pairs, pids or []
        self.rates = (0.0, 0.0)

    def cpu(self) -> float:
        import psutil

        total = time.process_time()
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    times = proc.cpu_times()
                    total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def __enter__(self) -> Clock:
        self.wall, self.used = time.perf_counter(), self.cpu()
        return self

    def __exit__(self, *_: object) -> None:
        wall, used = time.perf_counter() - self.wall, self.cpu() - self.used
        self.rates = (self.pairs / wall, self.pairs / max(used, 1e-9))


def bench_loop(model: Path, docs: list[str], threads: int) -> tuple[float, float]:
    """llama.cpp's recipe in a loop: one pair per decode (workers never do this; a script would)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK, n_ctx=512,
                          n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def text(value: str) -> list[int]:
        return list(llm.tokenize(value.encode(), add_bos=False, special=False))

    def score(doc: str) -> float:
        llm._batch.reset()
        llm._batch.add_sequence([llm.token_bos(), *text(QUERY), llm.token_eos(), *text(doc), llm.token_eos()], 0, True)
        llm._ctx.kv_cache_clear()
        llm._ctx.decode(llm._batch)
        return float(llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0])

    for doc in docs[:4]:  # warm up
        score(doc)
    with Clock(len(docs)) as clock:
        for doc in docs:
            score(doc)
    llm.close()
    return clock.rates


def bench_scorer(model: Path, docs: list[str], threads: int) -> tuple[float, float]:
    """corral's scorer in this process: the worker's pairs and packed decodes, without Redis, HTTP or SQL."""
    from workers.engine import LoadedModel, LoadSpec
    from workers.rerank import rerank

    engine = LoadedModel(LoadSpec(path=model, embedding=True, n_ctx=512, n_gpu_layers=0, n_threads=threads,
                                  pooling_rank=True))
    rerank(engine, QUERY, docs[:4], truncate=True)
    with Clock(len(docs)) as clock:
        rerank(engine, QUERY, docs, truncate=True)
    engine.close()
    return clock.rates


def bench_stack(home: Path, model: Path, docs: list[str], threads: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(/v1/rerank rates, rerank job rates) on a real API server and worker (:class:`Clock`)."""
    with corral_stack(home, worker_threads=threads) as stack, httpx.Client(base_url=stack.base_url, timeout=900) as client:
        data = model.read_bytes()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        client.post(f"/api/blobs/{digest}", content=data).raise_for_status()
        created = client.post("/api/create", json={"model": BENCH_MODEL, "files": {model.name: digest}, "stream": False})
        assert created.status_code == 200, created.text
        warm = client.post("/v1/rerank", json={"model": BENCH_MODEL, "query": QUERY, "documents": docs[:4]})
        assert warm.status_code == 200, warm.text
        pids = [proc.proc.pid for proc in stack.procs]
        with Clock(len(docs), pids) as route:
            for i in range(0, len(docs), 1000):
                r = client.post("/v1/rerank", json={"model": BENCH_MODEL, "query": QUERY, "documents": docs[i : i + 1000]})
                assert r.status_code == 200, r.text
        lines = "".join(json.dumps({"query": QUERY, "documents": docs[i : i + 100]}) + "\n"
                        for i in range(0, len(docs), 100)).encode()
        with Clock(len(docs), pids) as jobs:
            job = client.post("/api/jobs", params={"kind": "rerank", "model": BENCH_MODEL}, content=lines,
                              headers={"Content-Type": "application/x-ndjson"})
            assert job.status_code == 202, job.text
            state = wait_for_job(client, job.json()["id"], poll=0.25)
        assert state["counts"]["succeeded"] == len(lines.splitlines()), state
        return route.rates, jobs.rates


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per document (one per word)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-stack", action="store_true", help="only the in-process rows")
    args = parser.parse_args()
    docs = documents(args.pairs, args.tokens)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model = write_reranker(home / "bench-reranker.gguf")
        # on corral's compute thread, like the worker's decodes (workers/compute.py: one OpenMP master per process)
        loads = [os.getloadavg()[0]]
        rates = [compute.run(bench_loop, model, docs, args.threads)]
        loads.append(os.getloadavg()[0])
        rates.append(bench_scorer(model, docs, args.threads))
        loads.append(os.getloadavg()[0])
        if not args.skip_stack:
            rates.extend(bench_stack(home, model, docs, args.threads))
            loads.extend([os.getloadavg()[0]] * 2)
    labels = ["llama-cpp-python loop, one pair per decode (baseline)",
              "corral scorer in-process (the raw packed decode)",
              f"POST /v1/rerank, {min(1000, args.pairs)} documents a request",
              "rerank job, 100 documents a line, upload to completion"]
    (loop, loop_cpu), (scorer, scorer_cpu) = rates[0], rates[1]
    # the 1-minute load average after each row: on a shared machine a row run beside other work is slowed
    rows = [[label, wall, f"{wall / loop:.2f}x", f"{wall / scorer:.2f}x", cpu, f"{cpu / loop_cpu:.2f}x",
             f"{cpu / scorer_cpu:.2f}x", f"{load:.1f}"]
            for label, (wall, cpu), load in zip(labels, rates, loads[1:])]
    print_table(
        f"{args.pairs} pairs (query + ~{args.tokens}-token document), random-weight BERT cross-encoder "
        f"(6 x 384, f16), {args.threads} threads, CPU (load average {loads[0]:.1f} before)",
        ["path", "pairs/s", "vs loop", "vs raw", "pairs/CPU-s", "vs loop", "vs raw", "load after"], rows,
    )


if __name__ == "__main__":
    main()
