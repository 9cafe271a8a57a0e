"""Deduplication and the result cache: a deterministic request runs once.

A generate or chat item is deterministic when its options (the job's, overridden by the item's) fix
``temperature: 0`` or a ``seed`` of 0 or more; its :func:`request_key` hashes the model (the manifest digest,
which covers the weights and every layer that shapes the rendered prompt: template, system, parameters,
adapters), the kind, the request body (its ``metadata`` aside) and those options.  Sampled requests without a
seed get no key and are never deduplicated.

- Within a job, items with the same key are put in one chunk at submission (jobs/service.py), and the worker
  runs one of them and writes its result to all (workers/batch.py): each still has its own result line.
- Across jobs, a job submitted with ``cache: true`` takes the results of keys the cache holds (younger than
  ``CORRAL_RESULT_CACHE_TTL``) at submission, marked ``cached: true`` and never queued, and adds its own
  successes to the cache.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.models import CachedResult, utcnow

DEDUP_KINDS = ("generate", "chat")
# Keys remembered per submission for placing duplicates in one chunk: past this many distinct keys, a late
# duplicate of an early request may run again (memory stays bounded for million-line jobs).
MAX_TRACKED_KEYS = 200_000


def deterministic(options: dict[str, Any]) -> bool:
    temperature, seed = options.get("temperature"), options.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0:
        return True
    try:
        return temperature is not None and float(temperature) == 0.0
    except (TypeError, ValueError):
        return False


def request_key(model: str, kind: str, body: dict[str, Any], job_options: dict[str, Any]) -> str | None:
    """The key of a deterministic request (see the module docstring), or None."""
    if kind not in DEDUP_KINDS:
        return None
    options = {**job_options, **(body.get("options") or {})}
    if not deterministic(options):
        return None
    request = {k: v for k, v in body.items() if k not in ("metadata", "options")}
    text = json.dumps({"model": model, "kind": kind, "request": request, "options": options},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def lookup(session: Session, keys: list[str], ttl: int) -> dict[str, CachedResult]:
    """The cached results of ``keys`` that are younger than ``ttl`` seconds."""
    if not keys or ttl <= 0:
        return {}
    cutoff = utcnow() - timedelta(seconds=ttl)
    found: dict[str, CachedResult] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), 500):
        query = select(CachedResult).where(CachedResult.key.in_(unique[start : start + 500]), CachedResult.created_at >= cutoff)
        found.update((row.key, row) for row in session.scalars(query))
    return found


def store(session: Session, key: str, output: dict[str, Any], prompt_tokens: int | None, completion_tokens: int | None) -> None:
    """Keep (or renew) the result of ``key``; the caller commits.  Two workers storing one key at once: one wins."""
    try:
        with session.begin_nested():
            session.execute(delete(CachedResult).where(CachedResult.key == key))
            session.execute(insert(CachedResult).values(
                key=key, output=output, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, created_at=utcnow()))
    except IntegrityError:
        pass


def prune(session: Session, ttl: int) -> int:
    """Drop results older than ``ttl`` seconds (the reconciler's sweep); how many went."""
    result = session.execute(delete(CachedResult).where(CachedResult.created_at < utcnow() - timedelta(seconds=ttl)))
    return int(getattr(result, "rowcount", 0) or 0)
