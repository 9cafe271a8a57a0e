"""Prefix grouping end to end: a job's prompts are chunked by shared prefix, and the worker prefills a shared
prefix once and copies it to the prompts that share it (the decoded-token count comes from the worker's
heartbeat, ``prompt_tokens_decoded`` in /api/queue)."""

from __future__ import annotations

import random

from sqlalchemy import select

from corral.settings import Settings
from jobs.db import sessions
from jobs.models import Item
from tests.helpers import results, settled_counts, submit, wait_done

WORDS = "budget carry detail derive domain column credit border branch average answer account".split()


def rubric(seed: int, words: int = 220) -> str:
    rng = random.Random(seed)
    return f"Rubric {seed}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\n\n"


def test_interleaved_prompts_are_chunked_by_prefix_and_results_keep_input_order(base_url: str, settings: Settings) -> None:
    rubrics = [rubric(1, 40), rubric(2, 40)]
    items = [{"custom_id": f"item-{n}", "prompt": rubrics[n % 2] + f"Input {n}.",
              "options": {"num_predict": 2, "temperature": 0.5}} for n in range(8)]
    job = submit(base_url, kind="generate", chunk_size=4, items=items)
    with sessions(settings)() as session:
        rows = session.execute(select(Item.chunk_id, Item.seq).where(Item.job_id == job["id"])).all()
    chunks: dict[str, set[int]] = {}
    for chunk, seq in rows:
        chunks.setdefault(chunk, set()).add(seq % 2)
    assert len(chunks) == 2 and all(len(parities) == 1 for parities in chunks.values())  # one rubric per chunk
    assert wait_done(base_url, job["id"])["status"] == "completed"
    assert [line["custom_id"] for line in results(base_url, job["id"])] == [f"item-{n}" for n in range(8)]


def test_a_shared_prefix_is_prefilled_once_per_chunk(base_url: str) -> None:
    shared = rubric(3)  # about 250 tokens, in no other test
    items = [{"prompt": shared + f"Input {n}: the {WORDS[n]} of item {n}.", "raw": True,
              "options": {"num_predict": 2, "temperature": 0.5}} for n in range(8)]
    before, _ = settled_counts(base_url)
    job = submit(base_url, kind="generate", chunk_size=8, items=items)
    assert wait_done(base_url, job["id"])["status"] == "completed"
    spent = settled_counts(base_url)[0] - before
    lengths = [line["response"]["prompt_eval_count"] for line in results(base_url, job["id"])]
    # Eight prompts of ~260 tokens: decoding each in full would be ~2,100 tokens.  Grouped: the prefix once,
    # then each prompt's own tail (under 20 tokens) after a copy of the leader's cells.
    assert spent <= max(lengths) + 8 * 20, (spent, lengths)
