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

The rows alternate: ``--repeat`` rounds, each running every row once, in the order above and then reversed
(A B C D E, E D C B A, ...), with the raw batched decode and the job side by side, and the job's stack and the
decode loop's model loaded once for all rounds.  This VM's speed drifts by up to 40% within minutes, so rows
measured minutes apart cannot be compared to 0.05; besides each row's best, the table gives the median of each
round's job / raw ratio, which drift moves much less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table, run_generate_job
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


def bench_sequential(model: Path, texts: list[str], tokens: int, threads: int | None) -> float:
    """One run of the sequential loop.  ``threads=None``: llama-cpp-python's defaults, as a plain ``Llama(path)``
    gets them."""
    from llama_cpp import Llama

    tuned = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
    llm = Llama(str(model), n_ctx=N_CTX, verbose=False, **tuned)
    llm.create_completion(texts[0], max_tokens=4, temperature=0)  # warm up
    started, produced = time.perf_counter(), 0
    for text in texts:
        produced += llm.create_completion(text, max_tokens=tokens, temperature=0)["usage"]["completion_tokens"]
    rate = produced / (time.perf_counter() - started)
    llm.close()
    return rate


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


def decode_loop_once(engine: Any, texts: list[str], tokens: int) -> float:
    """One run of corral's decode loop, in this process, on an engine loaded once for every round."""
    options = {"temperature": 0, "num_predict": tokens}
    started = time.perf_counter()
    handles = [engine.start(engine.raw_prompt(t), options, stops=[], fmt=None, interactive=False, stream=False)
               for t in texts]
    produced = sum(h.stream(lambda _: False, lambda: False).eval_count for h in handles)
    return produced / (time.perf_counter() - started)


def job_once(client: httpx.Client, texts: list[str], tokens: int) -> float:
    """One batch job end to end, on the stack started once for every round."""
    elapsed, lines = run_generate_job(client, texts, tokens, poll=0.25)
    return sum(line["response"]["eval_count"] for line in lines) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=4, help="alternating rounds (each row once per round)")
    parser.add_argument("--cpu-weights", choices=get_args(CpuWeights), default="auto",
                        help="CORRAL_CPU_WEIGHTS of the job's worker; the raw and decode-loop rows use the same file")
    parser.add_argument("--pause", type=float, default=2.0,
                        help="seconds between rows, so one row's spinning OpenMP threads do not slow the next")
    args = parser.parse_args()
    from workers.engine import LoadedModel, LoadSpec

    texts = prompts(args.prompts)
    weights = choose_weights(args.cpu_weights, "Q4_1", on_cpu=True, parallel=args.slots, embedding=False)
    label = "Q8_0 copy" if weights == "q8_0" else "Q4_1"
    names = [
        "create_completion loop, llama-cpp-python defaults (baseline)",
        f"create_completion loop, {args.threads} decode threads",
        f"corral decode loop, {args.slots} slots, in-process, {label}",
        f"raw batched llama_decode, {args.slots} slots, in-process, {label}",
        f"corral batch job end to end, {args.slots} slots, {label}",
    ]
    rates: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        model = model_path(home, "smollm2")
        batched_model = prepare(model, weights, threads=args.threads)  # what a worker with these settings loads
        with corral_stack(home, num_parallel=args.slots, context_length=N_CTX, cpu_weights=args.cpu_weights) as stack, \
                httpx.Client(base_url=stack.base_url, timeout=600) as client:
            client.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                               "options": {"num_predict": 2}})  # the worker loads the model
            engine = LoadedModel(LoadSpec(path=model, embedding=False, n_ctx=N_CTX, n_gpu_layers=0,
                                          n_threads=args.threads, parallel=args.slots, weights=weights))
            # llama-cpp-python's own rows decode on corral's compute thread too: one OpenMP master per process
            # (workers/compute.py), else whichever row runs second is throttled by libgomp.
            runs: list[Callable[[], float]] = [
                lambda: compute.run(bench_sequential, model, texts, args.tokens, None),
                lambda: compute.run(bench_sequential, model, texts, args.tokens, args.threads),
                lambda: decode_loop_once(engine, texts, args.tokens),
                lambda: compute.run(raw_batched_once, batched_model, texts, args.tokens, args.threads, args.slots),
                lambda: job_once(client, texts, args.tokens),
            ]
            try:
                for round_ in range(args.repeat):
                    order = list(range(len(names)))
                    for i in order if round_ % 2 == 0 else reversed(order):
                        rates[names[i]].append(runs[i]())
                        print(f"  round {round_ + 1}: {names[i]}: {rates[names[i]][-1]:.1f} tok/s", file=sys.stderr)
                        time.sleep(args.pause)
            finally:
                engine.close()
    best = {name: max(values) for name, values in rates.items()}
    plain, sequential, raw = best[names[0]], best[names[1]], best[names[3]]
    rows = [
        [name, best[name], " / ".join(f"{v:.1f}" for v in rates[name]), f"{best[name] / plain:.2f}x",
         f"{best[name] / sequential:.2f}x", f"{best[name] / raw:.2f}x"]
        for name in names
    ]
    print_table(
        f"{args.prompts} prompts x {args.tokens} new tokens, SmolLM2-135M Q4_1, {args.threads} threads, "
        f"{args.repeat} alternating rounds, best of each",
        ["path", "tok/s", "per round", "vs plain loop", f"vs {args.threads}-thread loop", "vs raw batched"], rows,
    )
    paired = [job / raw for job, raw in zip(rates[names[4]], rates[names[3]])]
    loop_paired = [loop / raw for loop, raw in zip(rates[names[2]], rates[names[3]])]
    print(f"\nbatch job / raw batched, each round: {' / '.join(f'{r:.2f}' for r in paired)}; "
          f"median {statistics.median(paired):.2f}x")
    print(f"decode loop / raw batched, each round: {' / '.join(f'{r:.2f}' for r in loop_paired)}; "
          f"median {statistics.median(loop_paired):.2f}x")

if __name__ == "__main__":
    main()
