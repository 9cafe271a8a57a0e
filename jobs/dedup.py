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

The cache is per owner: a hit, with its ``created_at``, tells the submitter that the request ran before and
when, so one API key must never hit another's entries.  An entry is stored under :func:`cache_key`, the request
key hashed with the job's :func:`cache_scope` (its owner; everyone's with ``CORRAL_RESULT_CACHE_SHARED``), which both
the submission (lookups) and the worker (stores) compute.  Entries of the former, unscoped format are bare
request keys: no scoped key equals one, so they are never hit again and the reconciler prunes them with age.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.models import CachedResult, Job, utcnow

DEDUP_KINDS = ("generate", "chat")
SHARED_SCOPE = "shared"  # CORRAL_RESULT_CACHE_SHARED: one cache for every owner
CACHE_KEY_FORMAT = "corral-result-cache/2"  # hashed into every cache key: a new format leaves old entries unreachable
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


def cache_scope(owner: str | None, shared: bool) -> str:
    """Whose result cache a job of ``owner`` (an API key's id; None with keys off, one anonymous owner whose
    jobs all share) reads and adds to: the owner's own, or with ``shared`` everyone's."""
    return SHARED_SCOPE if shared else f"owner:{owner or ''}"


def job_cache_scope(session: Session, job_id: str, shared: bool) -> str:
    """:func:`cache_scope` of a stored job (the worker's side: a chunk knows its job, not its owner)."""
    return cache_scope(None if shared else session.scalar(select(Job.owner).where(Job.id == job_id)), shared)


def cache_key(key: str, scope: str) -> str:
    """Where the result cache keeps request ``key`` for ``scope``: one owner's entries are no other's."""
    text = json.dumps([CACHE_KEY_FORMAT, scope, key], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def lookup(session: Session, keys: list[str], ttl: int, scope: str) -> dict[str, CachedResult]:
    """The cached results of request ``keys`` in ``scope`` that are younger than ``ttl`` seconds, by request key
    (the primary key's index answers each batch)."""
    if not keys or ttl <= 0:
        return {}
    cutoff = utcnow() - timedelta(seconds=ttl)
    found: dict[str, CachedResult] = {}
    request_of = {cache_key(key, scope): key for key in set(keys)}
    unique = sorted(request_of)
    for start in range(0, len(unique), 500):
        query = select(CachedResult).where(CachedResult.key.in_(unique[start : start + 500]), CachedResult.created_at >= cutoff)
        found.update((request_of[row.key], row) for row in session.scalars(query))
    return found


def store(session: Session, key: str, output: dict[str, Any], prompt_tokens: int | None, completion_tokens: int | None) -> None:
    """Keep (or renew) the result under ``key`` (a :func:`cache_key`); the caller commits.  Two workers storing
    one key at once: one wins."""
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
