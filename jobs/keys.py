"""API keys: created and revoked by the operator (``corral keys``), checked by the API on every request.

A key is ``corral-`` + 43 url-safe characters (256 random bits) and is shown once; the database keeps its
sha256 only.  Jobs, batches and files carry the id of the key that made them; a key sees its own, an admin key
sees everyone's.  Lookups are cached for a few seconds so a busy API does not query per token stream.

While the database is unreachable (a PostgreSQL restart, issue #38) a key checked in the last
:data:`STALE_SECONDS` keeps its last answer, so interactive requests, which need no other SQL, go on; a key not
seen that recently gets the 503 every job route gives then (it cannot be told from an unknown one).
"""

from __future__ import annotations

import builtins
import fnmatch
import hashlib
import json
import logging
import secrets
import threading
import time as clock
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from corral.errors import BadRequest, Conflict, NotFound
from corral.modelstore.store import DEFAULT_TAG, ModelName
from corral.settings import Settings
from corral.timefmt import duration_seconds
from jobs import readstates
from jobs.db import reason, sessions, unreachable
from jobs.ids import new_id
from jobs.models import ApiKey, Item, Job, KeyUsage, utcnow

log = logging.getLogger(__name__)
CACHE_SECONDS = 5.0
# While the database is unreachable: how old a key's last answer may be and still serve (a revocation committed
# before the outage was read within CACHE_SECONDS of it), and how long the next look waits before trying SQL again
# (a connect to a lost host takes jobs.db.CONNECT_TIMEOUT; each request must not pay it).
STALE_SECONDS = 600.0
RECHECK_SECONDS = 1.0


class KeyLimits(BaseModel):
    """What one key may use (``corral keys create --rpm ...``); None: no limit of that kind.  Keys without limits
    of their own get ``CORRAL_KEY_LIMITS``."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, description="Requests per minute (moving window).")
    tpm: int | None = Field(None, ge=1, description="Prompt plus generated tokens per minute, on sync traffic.")
    max_concurrent: int | None = Field(None, ge=1, description="Open requests and streams at once.")
    max_queued_items: int | None = Field(None, ge=1, description="Pending batch items across the key's jobs.")
    token_budget: int | None = Field(None, ge=1, description="Tokens per budget_period, sync traffic.")
    budget_period: str | None = Field(None, description="1d, 7d, 30d, or any number of s/m/h/d.")
    models: list[str] | None = Field(None, description="Models the key may use (globs); others are a 403.")

    @field_validator("budget_period")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is not None:
            period_seconds(value)
        return value

    def budget_seconds(self) -> int:
        return period_seconds(self.budget_period or "1d")

    def allows(self, model: str) -> bool:
        """Whether the allow-list (when there is one) lets the key use ``model`` (``name`` or ``name:tag``).

        The globs are matched against the name as sent and against the name the store resolves it to
        (``SmolLM2 `` is ``smollm2:latest``), so every spelling of one model gets the same answer."""
        if self.models is None:
            return True
        full = model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"
        candidates = {model, full}
        try:
            name = ModelName.parse(model)
        except BadRequest:
            pass  # not a model name: only the text as sent can match
        else:
            candidates.add(name.display)
            if name.tag == DEFAULT_TAG:
                candidates.add(name.display.rsplit(":", 1)[0])
        return any(fnmatch.fnmatchcase(candidate, pattern) for pattern in self.models for candidate in candidates)

    @classmethod
    def parse(cls, text: str) -> KeyLimits:
        """``CORRAL_KEY_LIMITS`` (JSON); a mistake there is the operator's: a clear error at start-up."""
        if not text.strip():
            return cls()
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise BadRequest(f"CORRAL_KEY_LIMITS is not valid: {exc}") from exc


def period_seconds(text: str) -> int:
    try:
        return duration_seconds(text)
    except ValueError as exc:
        raise ValueError(f"budget period {exc}") from exc


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (owner of what it creates), whether it may see everything, and its limits."""

    key_id: str
    name: str
    admin: bool
    limits: KeyLimits = field(default_factory=KeyLimits)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Create, list, revoke and check API keys."""

    def __init__(self, settings: Settings) -> None:
        self.sessions = sessions(settings)
        self.default_limits = KeyLimits.parse(settings.key_limits)
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self._unreachable_until = 0.0  # the database was unreachable: stale answers serve until then, untried
        self._unreachable_since: float | None = None  # when this outage began (one log line each way)

    def create(self, name: str, *, admin: bool = False, limits: KeyLimits | None = None) -> tuple[str, dict[str, Any]]:
        """Return (the key, shown once; its listing row)."""
        key = "corral-" + secrets.token_urlsafe(32)
        row = ApiKey(id=new_id("key"), name=name, prefix=key[:12], key_hash=hash_key(key), admin=admin,
                     limits=_stored(limits))
        with self.sessions() as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError as exc:
                raise Conflict(f"a key named '{name}' already exists") from exc
            return key, _row(row)

    def list(self) -> list[dict[str, Any]]:
        with self.sessions() as session:
            return [_row(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]

    def update(self, ident: str, limits: KeyLimits) -> dict[str, Any]:
        """Set a key's limits (by id or name): the fields given replace the key's; the others stay."""
        return self._set(ident, lambda row: {
            "limits": _stored(KeyLimits(**{**(row.limits or {}), **limits.model_dump(exclude_unset=True)}))})

    def _set(self, ident: str, values: Callable[[ApiKey], dict[str, Any]]) -> dict[str, Any]:
        """Update the key ``ident`` (id or name) with ``values(row)``; its listing row.  Cached lookups are
        dropped, so every key's next request sees the change."""
        with self.sessions() as session:
            row = self._find(session, ident)
            session.execute(update(ApiKey).where(ApiKey.id == row.id).values(**values(row)))
            session.commit()
            session.refresh(row)
            result = _row(row)
        with self._lock:
            self._cache.clear()
        return result

    @staticmethod
    def _find(session: Any, ident: str) -> ApiKey:
        row = session.get(ApiKey, ident) or session.scalars(select(ApiKey).where(ApiKey.name == ident)).first()
        if row is None:
            raise NotFound(f"no key with id or name '{ident}'")
        return row  # type: ignore[no-any-return]

    def revoke(self, ident: str) -> dict[str, Any]:
        """Revoke by id or name."""
        return self._set(ident, lambda _: {"revoked_at": utcnow()})

    def check(self, key: str) -> Principal | None:
        """The principal for a presented key, or None (unknown or revoked)."""
        return self.check_hash(hash_key(key))

    def check_hash(self, digest: str) -> Principal | None:
        """The principal for a key's sha256 (the operator console keeps that, never the key), or None."""
        now = clock.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit and now - hit[0] < CACHE_SECONDS:
                return hit[1]
            stale = hit is not None and now - hit[0] < STALE_SECONDS
            if stale and now < self._unreachable_until:
                return hit[1] if hit else None
        try:
            with self.sessions() as session:
                row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()
                principal = Principal(row.id, row.name, row.admin, self.limits_of(row)) if row else None
        except DBAPIError as exc:
            if not (stale and hit and unreachable(exc)):
                raise  # never seen lately: the API's 503 (api/errors.py)
            with self._lock:
                if self._unreachable_since is None:
                    self._unreachable_since = now
                    log.warning("the database is unreachable (%s): API keys checked in the last %.0f s keep their "
                                "last answer", reason(exc), STALE_SECONDS)
                self._unreachable_until = now + RECHECK_SECONDS
            return hit[1]
        with self._lock:
            if self._unreachable_since is not None:
                log.warning("the database answers again after %.1f s: API keys are checked there again",
                            now - self._unreachable_since)
                self._unreachable_since = None
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal


    def add_usage(self, amounts: dict[tuple[str, str, str], int]) -> None:
        """Add ``{(key id, ISO day, field): amount}`` to the daily usage rows (created as needed)."""
        rows: dict[tuple[str, str], dict[str, int]] = {}
        for (key_id, day, name), amount in amounts.items():
            rows.setdefault((key_id, day), {})[name] = int(amount)
        with self.sessions() as session:
            for (key_id, day), values in rows.items():
                when = date.fromisoformat(day)
                row = session.get(KeyUsage, (key_id, when), with_for_update=True)
                if row is None:
                    session.add(KeyUsage(key_id=key_id, day=when, **{k: values.get(k, 0) for k in USAGE_FIELDS}))
                    try:
                        session.flush()
                        continue
                    except IntegrityError:  # another API process made the row first
                        session.rollback()
                        row = session.get(KeyUsage, (key_id, when), with_for_update=True)
                session.execute(update(KeyUsage).where(KeyUsage.key_id == key_id, KeyUsage.day == when).values(
                    **{k: getattr(KeyUsage, k) + values.get(k, 0) for k in USAGE_FIELDS}))
            session.commit()

    def usage(self, key_id: str | None = None, since: date | None = None) -> builtins.list[dict[str, Any]]:
        """Per key and day: sync requests and tokens (key_usage), and batch items with their tokens (counted from
        the items the key's jobs finished that day).  ``key_id`` None: every key."""
        since = since or date(1970, 1, 1)
        table: dict[tuple[str, str], dict[str, Any]] = {}
        with self.sessions() as session:
            names = {r.id: r.name for r in session.scalars(select(ApiKey))}
            query = select(KeyUsage).where(KeyUsage.day >= since)
            if key_id:
                query = query.where(KeyUsage.key_id == key_id)
            for row in session.scalars(query):
                entry = table.setdefault((row.key_id, row.day.isoformat()), _usage_entry())
                for name in USAGE_FIELDS:
                    entry[name] += getattr(row, name)
            finished = readstates.finished_at()  # a stopped job's pending items finished when it stopped
            day = func.date(finished)
            batch = (select(Job.owner, day, func.count(Item.id), func.coalesce(func.sum(Item.prompt_tokens), 0),
                            func.coalesce(func.sum(Item.completion_tokens), 0))
                     .join(Job, Job.id == Item.job_id)
                     .where(finished.is_not(None), finished >= datetime.combine(since, time.min),
                            Job.owner.is_not(None))
                     .group_by(Job.owner, day))
            if key_id:
                batch = batch.where(Job.owner == key_id)
            for owner, when, items, prompt, generated in session.execute(batch):
                entry = table.setdefault((owner, str(when)[:10]), _usage_entry())
                entry["batch_items"] += int(items)
                entry["batch_prompt_tokens"] += int(prompt)
                entry["batch_generated_tokens"] += int(generated)
        return [{"key_id": k, "key": names.get(k, k), "day": d, **v} for (k, d), v in sorted(table.items())]

    def limits_of(self, row: ApiKey) -> KeyLimits:
        """The key's own limits, or the server's default for a key that has none."""
        return KeyLimits.model_validate(row.limits) if row.limits else self.default_limits


USAGE_FIELDS = ("requests", "prompt_tokens", "generated_tokens", "embed_inputs")


def _usage_entry() -> dict[str, int]:
    return {**dict.fromkeys(USAGE_FIELDS, 0), "batch_items": 0, "batch_prompt_tokens": 0, "batch_generated_tokens": 0}


def _stored(limits: KeyLimits | None) -> dict[str, Any] | None:
    values = limits.model_dump(exclude_none=True) if limits else {}
    return values or None


def _row(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "prefix": row.prefix, "admin": bool(row.admin),
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "limits": row.limits or {},
    }
