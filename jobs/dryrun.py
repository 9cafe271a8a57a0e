"""A job's dry run (``POST /api/jobs?dry_run=true``, ``corral submit --dry-run``): every line validated as a
submission validates it, then counted, and nothing stored or queued.

The answer: the item count; the prompt tokens, counted by a worker with the model's own tokenizer and template
exactly as a run renders them (``count``: batches of at most :data:`COUNT_BATCH` items and about
:data:`COUNT_BATCH_BYTES` of JSON); the duplicates that would not run (jobs/dedup.py); the most tokens the items
may generate; and an ETA from the throughput the live workers have measured on the model (null, with the
reason, when none has).

A dry run costs a worker and Redis, though it stores nothing, so it is bounded (the route also counts it as one
of the key's requests, api/jobs.py):

- at most ``CORRAL_DRY_RUN_MAX_LINES`` lines and ``CORRAL_DRY_RUN_MAX_TOKENS`` counted prompt tokens, a 413
  past either (a sample estimates a larger job as well: every figure but the ETA's basis is a sum per line).
  The token cap is checked after each batch, so a worker counts at most one batch past it;
- each batch is one Celery message held in Redis until a worker takes it, and the route sends the next only
  when the last is counted, so Redis holds one batch at a time: a batch closes before the item that would take
  it past :data:`COUNT_BATCH_BYTES` (one line of up to 1 MiB still goes alone).  Before this cap, 500 lines of
  a 30 MB upload were one message, and Redis grew by 85 MB.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from corral.errors import BadRequest, PayloadTooLarge
from corral.modelstore.store import ModelRecord
from corral.options import LoadOptions, SamplingOptions
from corral.settings import Settings
from jobs import dedup

COUNT_BATCH = 500
COUNT_BATCH_BYTES = 256 << 10  # of items' JSON per count message (Celery base64-encodes it: ~4/3 of this in Redis)
TokenCounter = Callable[[list[dict[str, Any]]], list["int | None"]]


def output_bound(kind: str, body: dict[str, Any], options: dict[str, Any], num_ctx: int) -> int:
    """The most tokens an item may generate: its ``num_predict`` (the item's over the job's), or, unlimited
    (absent or negative), the whole context."""
    if kind in ("embed", "rerank"):
        return 0
    merged = {**options, **(body.get("options") or {})}
    context = LoadOptions.of(merged).num_ctx or num_ctx
    predict = SamplingOptions.of(merged).num_predict
    return context if predict < 0 else min(predict, context)


def dry_run(
    settings: Settings, record: ModelRecord, model: str, kind: str, options: dict[str, Any],
    items: Iterable[tuple[str | None, dict[str, Any]]], check: Callable[[dict[str, Any], int], None],
    count: TokenCounter, tokens_per_second: float | None, workers: int,
) -> dict[str, Any]:
    """The dry run's answer (see the module docstring).  ``check`` raises for an item a submission refuses;
    ``tokens_per_second`` is what the live ``workers`` serving the model generate together."""
    n = duplicates = unrendered = prompt_tokens = bound = batch_bytes = 0
    max_lines, max_tokens = settings.dry_run_max_lines, settings.dry_run_max_tokens
    seen: set[bytes] = set()
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal prompt_tokens, unrendered, batch_bytes
        for counted in count(batch):
            if counted is None:
                unrendered += 1
            else:
                prompt_tokens += counted
        batch.clear()
        batch_bytes = 0
        if prompt_tokens > max_tokens:
            raise PayloadTooLarge(
                f"a dry run counts at most {max_tokens} prompt tokens (CORRAL_DRY_RUN_MAX_TOKENS): {prompt_tokens} "
                f"were counted by line {n}; dry-run a sample of the job")

    for _, body in items:
        n += 1
        if n > max_lines:
            raise PayloadTooLarge(
                f"a dry run reads at most {max_lines} lines (CORRAL_DRY_RUN_MAX_LINES): dry-run a sample of the job, "
                f"such as its first {max_lines} lines")
        check(body, n)
        key = dedup.request_key(record.digest, kind, body, options)
        if key is not None:
            short = bytes.fromhex(key)[:16]
            if short in seen:
                duplicates += 1
                continue  # runs once: neither its prompt nor its output costs anything
            if len(seen) < 5 * dedup.MAX_TRACKED_KEYS:
                seen.add(short)
        bound += output_bound(kind, body, options, settings.default_num_ctx)
        size = _size(body)
        if batch and batch_bytes + size > COUNT_BATCH_BYTES:
            flush()
        batch.append(body)
        batch_bytes += size
        if len(batch) >= COUNT_BATCH:
            flush()
    if n == 0:
        raise BadRequest("no items: the input is empty")
    if batch:
        flush()
    answer: dict[str, Any] = {
        "object": "job.dry_run",
        "kind": kind,
        "model": model,
        "items": n,
        "duplicates": duplicates,
        "prompt_tokens": prompt_tokens,
        "output_token_bound": bound,
        "items_failing": unrendered,
        "eta_seconds": None,
        "eta": None,
    }
    if kind in ("embed", "rerank"):
        what = "embedding" if kind == "embed" else "rerank"
        answer["eta"] = {"reason": f"{what} jobs have no generation rate to go by; their time follows prompt_tokens"}
    elif not tokens_per_second:
        answer["eta"] = {"reason": f"no live worker has measured its throughput on {model} yet: run a job or a "
                                   "request on it first"}
    else:
        answer["eta_seconds"] = round(bound / tokens_per_second, 1)
        answer["eta"] = {"tokens_per_second": round(tokens_per_second, 1), "workers": workers,
                         "basis": "output_token_bound at the live workers' measured generation rate: an upper bound"}
    return answer


def _size(body: dict[str, Any]) -> int:
    """Bytes of an item's JSON as orjson writes it (UTF-8; the message's ASCII escapes may take more); an item
    orjson cannot write (an integer beyond 64 bits) is sized by the standard library."""
    try:
        return len(orjson.dumps(body))
    except orjson.JSONEncodeError:
        return len(json.dumps(body, default=str).encode())
