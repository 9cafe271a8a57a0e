"""Batch generation throughput: a corral batch job vs llama-cpp-python in-process, sequential and batched.

    .venv/bin/python bench/batch_generate.py [--prompts 64] [--tokens 64] [--slots 8]

Every row generates ``--tokens`` new tokens (greedy) for the same ``--prompts`` continuation prompts ("Once
upon a time, ..." so the instruct model keeps going) with SmolLM2-135M Q4_1 and counts the tokens really
generated (a story may end early); each row is the best of ``--repeat`` runs:
1. a sequential ``Llama.create_completion`` loop in this process with llama-cpp-python's defaults (the issue's
   "plain loop": ``n_threads`` = half the cores for one-token decodes, ``n_threads_batch`` = all of them);
   the issue's numbers (50 tok/s sequential vs 127 / 138 tok/s raw batched at 8 / 16 slots) are this loop;
1b. the same loop with ``--threads`` decode threads, as corral's worker runs: the stricter baseline;
2. the raw batched decode in this process: one ``llama_batch`` with ``--slots`` sequences per
   ``llama_decode``, greedy sampling, no stop strings or text: the engine's ceiling at that slot count;
3. corral's decode loop (workers/decode_loop.py) in this process: the job system minus SQL, Celery and HTTP;
4. a corral batch job end to end: JSON upload -> SQL -> Celery chunks -> a real worker process with
   ``OLLAMA_NUM_PARALLEL=--slots`` -> results in SQL, timed from the upload to the job's completion.
Rows 2-4 decode from the weights a CPU worker with ``--cpu-weights`` loads (the default ``auto``: a Q8_0 copy
of the Q4_1 file, workers/weights.py); rows 1 and 1b always run the Q4_1 file as pulled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table, wait_for_job
from corral.settings import CpuWeights
from workers import compute
from workers.weights import choose_weights, prepare

SUBJECTS = (
    "a dragon|a small robot|the old lighthouse keeper|a lost cat|two brothers|a clockmaker|the last tree|"
    "a shy wizard|a river|an astronaut|the baker's daughter|a pirate ship|a snowman|a village|the moon|a young fox"
).split("|")
PLACES = ["in a valley", "by the sea", "in the city", "on a mountain"]
N_CTX = 2048


def prompts(n: int) -> list[str]:
    combos = [f"Once upon a time, {s} {p}" for p in PLACES for s in SUBJECTS]
    return [combos[i % len(combos)] + ("," if i < len(combos) else f", day {i}") for i in range(n)]


def bench_sequential(model: Path, texts: list[str], tokens: int, threads: int | None, repeat: int) -> float:
    """``threads=None``: llama-cpp-python's defaults, as a plain ``Llama(path)`` gets them."""
    from llama_cpp import Llama

    tuned = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    llm = Llama(str(model), n_ctx=N_CTX, verbose=False, **tuned)
    llm.create_completion(texts[0], max_tokens=4, temperature=0)  # warm up
    rates = []
    for _ in range(repeat):
        started, produced = time.perf_counter(), 0
        for text in texts:
            produced += llm.create_completion(text, max_tokens=tokens, temperature=0)["usage"]["completion_tokens"]
        rates.append(produced / (time.perf_counter() - started))
    llm.close()
    return max(rates)


def bench_raw_batched(model: Path, texts: list[str], tokens: int, threads: int, slots: int, repeat: int) -> float:
    return max(raw_batched_once(model, texts, tokens, threads, slots) for _ in range(repeat))


def raw_batched_once(model: Path, texts: list[str], tokens: int, threads: int, slots: int) -> float:
    """The low-level API as its examples use it: ``slots`` sequences per decode, refilled as they end."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=64, n_threads=threads, verbose=False)  # model + tokenizer only
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = N_CTX * slots, 512, 512, slots
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = False
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    memory = llama_cpp.llama_get_memory(ctx)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    samplers = []
    for _ in range(slots):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        samplers.append(chain)
    waiting = [list(llm.tokenize(t.encode(), add_bos=True)) for t in texts]
    active: dict[int, dict] = {}
    started, produced = time.perf_counter(), 0
    while waiting or active:
        for slot in range(slots):
            if slot not in active and waiting:
                llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
                active[slot] = {"todo": waiting.pop(0), "pos": 0, "n": 0}
        batch.n_tokens = 0
        rows = []
        for slot, seq in sorted(active.items()):  # slot order: one micro-batch per step (see DecodeLoop._step)
            for k, token in enumerate(seq["todo"]):
                j = batch.n_tokens
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, seq["pos"] + k, 1
                batch.seq_id[j][0], batch.logits[j] = slot, k == len(seq["todo"]) - 1
                batch.n_tokens += 1
            seq["pos"] += len(seq["todo"])
            rows.append((slot, batch.n_tokens - 1))
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        for slot, row in rows:
            token = llama_cpp.llama_sampler_sample(samplers[slot], ctx, row)
            seq = active[slot]
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                del active[slot]
                continue
            seq["n"] += 1
            produced += 1
            seq["todo"] = [token]
            if seq["n"] >= tokens:
                del active[slot]
    rate = produced / (time.perf_counter() - started)
    for chain in samplers:
        llama_cpp.llama_sampler_free(chain)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llm.close()
    return rate


def bench_decode_loop(
    model: Path, texts: list[str], tokens: int, threads: int, slots: int, repeat: int, weights: str
) -> float:
    from workers.engine import LoadedModel, LoadSpec

    engine = LoadedModel(LoadSpec(path=model, embedding=False, n_ctx=N_CTX, n_gpu_layers=0, n_threads=threads,
                                  parallel=slots, weights=weights))
    options = {"temperature": 0, "num_predict": tokens}
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        handles = [engine.start(engine.raw_prompt(t), options, stops=[], fmt=None, interactive=False, stream=False)
                   for t in texts]
        produced = sum(h.stream(lambda _: False, lambda: False).eval_count for h in handles)
        rates.append(produced / (time.perf_counter() - started))
    engine.close()
    return max(rates)


def bench_job(home: Path, texts: list[str], tokens: int, slots: int, repeat: int, cpu_weights: str) -> float:
    with corral_stack(home, num_parallel=slots, context_length=N_CTX, cpu_weights=cpu_weights) as stack, \
            httpx.Client(base_url=stack.base_url, timeout=600) as client:
        client.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                           "options": {"num_predict": 2}})
        body = {"model": "smollm2", "kind": "generate", "options": {"temperature": 0, "num_predict": tokens},
                "items": [{"custom_id": str(i), "prompt": t, "raw": True} for i, t in enumerate(texts)]}
        rates = []
        for _ in range(repeat):
            started = time.perf_counter()
            job = client.post("/api/jobs", json=body).json()
            state = wait_for_job(client, job["id"], poll=0.25)
            elapsed = time.perf_counter() - started
            assert state["counts"]["succeeded"] == len(texts), state
            results = client.get(f"/api/jobs/{job['id']}/results").text.splitlines()
            rates.append(sum(json.loads(line)["response"]["eval_count"] for line in results) / elapsed)
        return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported (noisy VMs)")
    parser.add_argument("--cpu-weights", choices=get_args(CpuWeights), default="auto",
                        help="CORRAL_CPU_WEIGHTS of the job's worker; the raw and decode-loop rows use the same file")
    args = parser.parse_args()
    texts = prompts(args.prompts)
    weights = choose_weights(args.cpu_weights, "Q4_1", on_cpu=True, parallel=args.slots, embedding=False)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model = model_path(home, "smollm2")
        batched_model = prepare(model, weights, threads=args.threads)  # what a worker with these settings loads
        # llama-cpp-python's own rows decode on corral's compute thread too: one OpenMP master per process
        # (workers/compute.py), else whichever row runs second is throttled by libgomp.
        plain = compute.run(bench_sequential, model, texts, args.tokens, None, args.repeat)
        sequential = compute.run(bench_sequential, model, texts, args.tokens, args.threads, args.repeat)
        raw = compute.run(bench_raw_batched, batched_model, texts, args.tokens, args.threads, args.slots, args.repeat)
        loop = bench_decode_loop(model, texts, args.tokens, args.threads, args.slots, args.repeat, weights)
        job = bench_job(home, texts, args.tokens, args.slots, args.repeat, args.cpu_weights)
    label = "Q8_0 copy" if weights == "q8_0" else "Q4_1"
    rows = [
        [name, rate, f"{rate / plain:.2f}x", f"{rate / sequential:.2f}x", f"{rate / raw:.2f}x"]
        for name, rate in [
            ("create_completion loop, llama-cpp-python defaults (baseline)", plain),
            (f"create_completion loop, {args.threads} decode threads", sequential),
            (f"raw batched llama_decode, {args.slots} slots, in-process, {label}", raw),
            (f"corral decode loop, {args.slots} slots, in-process, {label}", loop),
            (f"corral batch job end to end, {args.slots} slots, {label}", job),
        ]
    ]
    print_table(
        f"{args.prompts} prompts x {args.tokens} new tokens, SmolLM2-135M Q4_1, {args.threads} threads, "
        f"best of {args.repeat}",
        ["path", "tok/s", "vs plain loop", f"vs {args.threads}-thread loop", "vs raw batched"], rows,
    )


if __name__ == "__main__":
    main()
