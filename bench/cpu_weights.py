"""Decode step cost and fidelity of the chat model's own Q4_1 weights vs the Q8_0 copy CPU workers decode from.

    .venv/bin/python bench/cpu_weights.py [--threads 2]

Makes, in a temporary directory, the Q8_0 copy (as ``workers/weights.py`` does), an F16 and a BF16 one of the
default chat model, then for each file prints (1) the median time of one ``llama_decode`` step of 1, 8 and 16
single-token sequences and the prefill cost per prompt token, and (2) fidelity against the F16 dequantization
of the same weights: mean next-token KL divergence and how often the top token is the same, over 16 prompts
and their 48-token greedy continuations (the F16 row is the reference itself).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import model_path, print_table
from workers.weights import prepare, quantize

PROMPTS = ["Once upon a time, a dragon", "The capital of France is", "def fibonacci(n):", "In 1969, astronauts",
           "Photosynthesis is the process", "My favourite recipe for pancakes", "The stock market fell because",
           "A haiku about winter:", "To install Python on Linux,", "The theory of relativity says",
           "Dear hiring manager, I am writing", "Ten tips for better sleep: 1.", "The cat sat on the",
           "SELECT name FROM", "Water boils at", "The history of Rome begins"]
PREFILL, SIZES, MAX_SEQ = 40, (1, 8, 16), 16


def step_costs(path: Path, threads: int) -> list[float]:
    """[prefill ms per token, step ms for each of SIZES] in a context like the decode loop's."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=threads, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 256 * MAX_SEQ, 512, 512, MAX_SEQ
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(tokens: list[tuple[int, int, int]]) -> float:  # (token, position, sequence)
        batch.n_tokens = len(tokens)
        for j, (token, pos, seq) in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = token, pos, 1, seq
            batch.logits[j] = True
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - started

    prefills = [decode([(100 + k, k, seq) for k in range(PREFILL)]) / PREFILL for seq in range(MAX_SEQ)]
    row = [statistics.median(prefills[1:]) * 1000]
    for n in SIZES:
        steps = [decode([(200, PREFILL + r, seq) for seq in range(n)]) for r in range(12)]
        for seq in range(MAX_SEQ):
            llama_cpp.llama_memory_seq_rm(memory, seq, PREFILL, -1)
        row.append(statistics.median(steps) * 1000)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llm.close()
    return row


def logits_of(path: Path, threads: int, texts: list[list[int]]) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, verbose=False, logits_all=True)
    out = []
    for tokens in texts:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[: len(tokens)], dtype=np.float64))
    llm.close()
    return out


def fidelity(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    """(mean KL(reference || other) per position, share of positions with the same top token)."""
    kls, same, total = [], 0, 0
    for ref, oth in zip(reference, other):
        p = np.exp(ref - ref.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        log_q = oth - oth.max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        kls.extend((p * (np.log(p + 1e-300) - log_q)).sum(1))
        same += int((ref.argmax(1) == oth.argmax(1)).sum())
        total += len(ref)
    return max(0.0, float(np.mean(kls))), same / total  # (rounding can make KL(p || p) a hair below 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import llama_cpp

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        native = model_path(home, "smollm2")
        q8 = prepare(native, "q8_0", threads=args.threads)
        f16 = home / "f16.gguf"
        quantize(native, f16, llama_cpp.LLAMA_FTYPE_MOSTLY_F16, threads=args.threads)
        bf16 = home / "bf16.gguf"
        quantize(native, bf16, llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, threads=args.threads)
        files = [("Q4_1 (as pulled)", native), ("Q8_0 copy (CORRAL_CPU_WEIGHTS=auto)", q8), ("F16 copy", f16),
                 ("BF16 copy", bf16)]

        reader = llama_cpp.Llama(str(native), n_ctx=256, n_threads=args.threads, verbose=False)
        texts = []
        for prompt in PROMPTS:
            text = reader.create_completion(prompt, max_tokens=48, temperature=0)["choices"][0]["text"]
            texts.append(list(reader.tokenize((prompt + text).encode())))
        reader.close()

        reference = logits_of(f16, args.threads, texts)
        rows = []
        for name, path in files:
            costs = step_costs(path, args.threads)
            kl, top1 = fidelity(reference, logits_of(path, args.threads, texts))
            rows.append([name, f"{path.stat().st_size / 2**20:.0f}", costs[0], *costs[1:],
                         *(f"{n / c * 1000:.0f}" for n, c in zip(SIZES, costs[1:])), f"{kl:.4f}", f"{top1:.3f}"])
    print_table(
        f"SmolLM2-135M weights on the CPU, {args.threads} threads: decode step cost, and fidelity to F16",
        ["weights", "MiB", "prefill ms/token", *(f"step of {n} ms" for n in SIZES),
         *(f"tok/s at {n}" for n in SIZES), "KL vs F16", "top-1 = F16"],
        rows,
    )


if __name__ == "__main__":
    main()
