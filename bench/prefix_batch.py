"""Prefix grouping (issue #24): a batch job whose prompts share long instructions, with grouping on and off.

    .venv/bin/python bench/prefix_batch.py [--items 512] [--prefixes 32] [--prefix-tokens 400] [--tokens 32]

``--items`` raw prompts, each one of ``--prefixes`` distinct ``--prefix-tokens``-token instructions (picked at
random, so the instructions are interleaved through the input) followed by a unique 20-40-token tail; each
item generates ``--tokens`` tokens (greedy).  The same job runs on a fresh stack (a real API and worker, SQLite)
with ``CORRAL_PREFIX_GROUPING=1`` and ``=0``.  The table gives the prompt tokens the worker really decoded (its
``prompt_tokens_decoded`` in ``/api/queue``: cells kept in a slot or copied from another slot are not
decoded), against the least possible: each distinct prefix once plus every tail, from the model's own
tokenizer.  Goals: decoded <= 1.2x the minimum with grouping; tok/s >= 2x the ungrouped run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table, run_generate_job

WORDS = (
    "account accurate action address adjust advice agent agree amount answer apply argue arrange assess assume "
    "attach attend author average balance basis battle behave benefit border branch budget build burden calm "
    "capital career carry cause center chance change charge check choice claim clear client close coach column "
    "commit common compare concern confirm connect consider contact contain content context control convert "
    "correct cost count cover create credit critic current cycle damage data debate decide define degree deliver "
    "demand depend deploy derive design detail detect develop device differ direct discuss display divide domain"
).split()


def instruction(rng: random.Random, k: int, tokenize: Any, length: int) -> str:
    """A rubric of about ``length`` tokens, different from the others from its first words."""
    words = [f"Rubric {k}: grade the input below on the following points."]
    while len(tokenize(" ".join(words))) < length:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def build(items: int, prefixes: int, prefix_tokens: int, model: Path) -> tuple[list[str], int]:
    """The prompts, and the fewest prompt tokens any schedule must decode (each distinct prefix once, plus
    each prompt's own tail), counted with the model's tokenizer as the worker tokenizes raw prompts."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return list(vocab.tokenize(text.encode(), add_bos=True, special=False))

    rng = random.Random(24)
    rubrics = [instruction(rng, k, tokenize, prefix_tokens) for k in range(prefixes)]
    texts, groups = [], {}
    for i in range(items):
        k = rng.randrange(prefixes)
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 28)))
        texts.append(f"{rubrics[k]}\n\nInput {i}: {tail}\nGrade:")
        groups.setdefault(k, []).append(tokenize(texts[-1]))
    minimum = 0
    for members in groups.values():
        shared = min(len(m) for m in members)
        for m in members[1:]:
            shared = min(shared, next((n for n, (a, b) in enumerate(zip(members[0], m)) if a != b), shared))
        minimum += shared + sum(len(m) - shared for m in members)
    return texts, minimum


def decoded(client: httpx.Client) -> tuple[int, int]:
    workers = client.get("/api/queue").json()["workers"]
    return sum(w.get("prompt_tokens_decoded", 0) for w in workers), sum(w.get("tokens_generated", 0) for w in workers)


def run(texts: list[str], tokens: int, grouping: bool) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="corral-prefix-bench-"))
    with corral_stack(home, prefix_grouping=grouping) as stack, httpx.Client(base_url=stack.base_url, timeout=600) as client:
        client.post("/api/generate", json={"model": "smollm2", "prompt": "Hi", "stream": False,
                                           "options": {"num_predict": 2}})
        time.sleep(1.5)  # a heartbeat with the warm-up's counts
        before, _ = decoded(client)
        elapsed, lines = run_generate_job(client, texts, tokens)
        generated = sum(line["response"]["eval_count"] for line in lines)
        prompt_total = sum(line["response"]["prompt_eval_count"] for line in lines)
        time.sleep(1.5)  # the worker's next heartbeat carries the job's counts
        after, _ = decoded(client)
    return {"seconds": elapsed, "generated": generated, "prompt_total": prompt_total, "decoded": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--prefixes", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", default="on,off", help="which runs: on, off or both (on,off)")
    args = parser.parse_args()
    model = model_path(Path(tempfile.mkdtemp(prefix="corral-prefix-model-")), "smollm2:135m")
    texts, minimum = build(args.items, args.prefixes, args.prefix_tokens, model)
    rows = []
    results = {}
    for grouping in [run == "on" for run in args.runs.split(",")]:
        r = results[grouping] = run(texts, args.tokens, grouping)
        rows.append([f"grouping {'on' if grouping else 'off'}", r["prompt_total"], r["decoded"], minimum,
                     r["decoded"] / minimum, r["generated"], r["seconds"], r["generated"] / r["seconds"]])
    print_table(
        f"{args.items} prompts, {args.prefixes} distinct {args.prefix_tokens}-token prefixes interleaved, "
        f"{args.tokens} tokens each (SmolLM2-135M, one CPU worker)",
        ["run", "prompt tokens", "decoded", "minimum", "decoded/min", "generated", "seconds", "tok/s"], rows,
    )
    if len(results) == 2:
        on, off = results[True], results[False]
        print(f"\ntok/s with grouping / without: {(on['generated'] / on['seconds']) / (off['generated'] / off['seconds']):.2f}x")


if __name__ == "__main__":
    main()
