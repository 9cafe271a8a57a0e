"""API keys: created and revoked by the operator (``corral keys``), checked by the API on every request.

A key is ``corral-`` + 43 url-safe characters (256 random bits) and is shown once; the database keeps its
sha256 only.  Jobs, batches and files carry the id of the key that made them; a key sees its own, an admin key
sees everyone's.  Lookups are cached for a few seconds so a busy API does not query per token stream.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from corral.errors import Conflict, NotFound
from corral.settings import Settings
from jobs.db import sessions
from jobs.models import ApiKey, utcnow
from jobs.service import new_id

CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (owner of what it creates) and whether it may see everything."""

    key_id: str
    name: str
    admin: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Create, list, revoke and check API keys."""

    def __init__(self, settings: Settings) -> None:
        self.sessions = sessions(settings)
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def create(self, name: str, *, admin: bool = False) -> tuple[str, dict[str, Any]]:
        """Return (the key, shown once; its listing row)."""
        key = "corral-" + secrets.token_urlsafe(32)
        row = ApiKey(id=new_id("key"), name=name, prefix=key[:12], key_hash=hash_key(key), admin=admin)
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

    def revoke(self, ident: str) -> dict[str, Any]:
        """Revoke by id or name."""
        with self.sessions() as session:
            row = session.get(ApiKey, ident) or session.scalars(select(ApiKey).where(ApiKey.name == ident)).first()
            if row is None:
                raise NotFound(f"no key with id or name '{ident}'")
            session.execute(update(ApiKey).where(ApiKey.id == row.id).values(revoked_at=utcnow()))
            session.commit()
            session.refresh(row)
            result = _row(row)
        with self._lock:
            self._cache.clear()
        return result

    def check(self, key: str) -> Principal | None:
        """The principal for a presented key, or None (unknown or revoked)."""
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        with self.sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).first()
            principal = Principal(row.id, row.name, row.admin) if row else None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal


def _row(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "prefix": row.prefix, "admin": bool(row.admin),
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }
