"""Per-key limits, enforced alike by every API replica, and per-key usage accounting.

Counters live in Redis, so two API processes share each limit: requests per minute in a moving window and
tokens per minute and per budget period in fixed windows (the ``limits`` package, the engine behind
Flask-Limiter), open requests in a sorted set per key.  A spent limit is a :class:`RateLimited` 429 with
``Retry-After`` in the route family's shape.  Tokens are known only when a reply ends, so a request is admitted
while the key's window still has room and its tokens are counted when it finishes (one request may overshoot,
as with every token limiter).

Usage (requests, prompt and generated tokens, embedding inputs) is added up in memory and written to SQL once
a second by a thread (jobs/keys.py ``add_usage``); batch items are counted from the items themselves.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from api.metrics import observe_key_tokens
from corral.errors import Forbidden, RateLimited
from corral.modelstore.store import ModelStore
from corral.protocol import KEY_PREFIX
from corral.redis_connection import redis_client
from corral.settings import Settings
from jobs.keys import KeyLimits, KeyStore, Principal

log = logging.getLogger(__name__)

STALE_OPEN_SECONDS = 6 * 3600  # an open-request entry left by an API process that died goes after this
FLUSH_SECONDS = 1.0


@dataclass
class Ticket:
    """An admitted request: whose, and whether it holds a place among the key's open requests."""

    principal: Principal
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    open: bool = False


class Governor:
    """Admit requests against their key's limits; count what they used when they end."""

    def __init__(self, settings: Settings, keys: KeyStore) -> None:
        self.settings = settings
        self.keys = keys
        self._storage: RedisStorage | None = None
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str, str]] = Counter()  # (key id, day, field) -> amount
        self._flusher: threading.Thread | None = None

    # -- admission ------------------------------------------------------------------------------------------

    def check_model(self, principal: Principal | None, model: str) -> None:
        """The key's model allow-list: a model outside it is a 403 (and absent from its listings)."""
        if principal is not None and not principal.limits.allows(model):
            raise Forbidden(f"model '{model}' is not allowed for the key '{principal.name}'")

    def allowed(self, principal: Principal | None, model: str) -> bool:
        return principal is None or principal.limits.allows(model)

    def visible(self, principal: Principal | None, names: Iterable[str]) -> list[str]:
        """The names among ``names`` the key may see (its allow-list): what /api/ps, /api/queue and the console
        list, so a limited key learns nothing of the other models, not even which are loaded."""
        return [name for name in names if self.allowed(principal, name)]

    def check_blob(self, principal: Principal | None, store: ModelStore, digest: str) -> None:
        """A blob belongs to the models whose manifests name it: an admin key (or anyone, keys off) reads any;
        another key only one named by a model it may use.  Otherwise a key limited to one model could read
        another's GGUF, or its SYSTEM layer (a house prompt may hold secrets), by digest.  A blob no model names
        (uploaded for a create not yet made) is an admin's alone.  The answer is the same whether the blob exists
        or not, so it is no oracle for guessing a prompt from its digest."""
        if principal is None or principal.admin:
            return
        if not any(principal.limits.allows(name.display) for name in store.names_using_blob(digest)):
            raise Forbidden(f"blob '{digest}' is not allowed for the key '{principal.name}': "
                            "no model the key may use has it")

    def admit(self, principal: Principal | None, model: str) -> Ticket | None:
        """Check every limit of the key before a sync request runs; None when keys are off.  Two Redis round
        trips: the moving window's script, then one pipeline that reads the token windows and takes a place
        among the open requests (bench/load.py --enforcement)."""
        if principal is None:
            return None
        self.check_model(principal, model)
        limits, key = principal.limits, principal.key_id
        now = time.time()
        if limits.rpm:
            item = RateLimitItemPerMinute(limits.rpm)
            if not self._moving().hit(item, "rpm", key):
                reset = self._moving().get_window_stats(item, "rpm", key).reset_time
                raise RateLimited(f"rate limit reached: {limits.rpm} requests per minute for the key "
                                  f"'{principal.name}'", retry_after=reset - now)
        windows = self._token_windows(limits)
        ticket = Ticket(principal)
        if not windows and not limits.max_concurrent:
            return ticket
        pipe = self._redis().pipeline()
        for label, item in windows:
            name = self._storage_().prefixed_key(item.key_for(label, key))
            pipe.get(name)
            pipe.ttl(name)
        if limits.max_concurrent:
            open_key = _open_key(key)
            pipe.zremrangebyscore(open_key, 0, now - STALE_OPEN_SECONDS)
            pipe.zadd(open_key, {ticket.request_id: now})
            pipe.zcard(open_key)
            pipe.expire(open_key, STALE_OPEN_SECONDS)
        replies = pipe.execute()
        ticket.open = bool(limits.max_concurrent)
        for i, (label, item) in enumerate(windows):
            used, ttl = int(replies[2 * i] or 0), int(replies[2 * i + 1])
            if used >= item.amount:
                self.release(ticket)
                what = "tokens per minute" if label == "tpm" else f"tokens per {limits.budget_period or '1d'} (budget)"
                raise RateLimited(f"rate limit reached: {item.amount} {what} for the key '{principal.name}'",
                                  retry_after=max(ttl, 1))
        if limits.max_concurrent and int(replies[2 * len(windows) + 2]) > limits.max_concurrent:
            self.release(ticket)
            raise RateLimited(f"rate limit reached: {limits.max_concurrent} open requests for the key "
                              f"'{principal.name}'", retry_after=1)
        return ticket

    def check_budget(self, principal: Principal | None) -> None:
        """Before a job is stored: a key whose token budget is spent cannot queue more work."""
        if principal is None:
            return
        for label, item in self._token_windows(principal.limits):
            if label == "budget":
                stats = self._fixed().get_window_stats(item, label, principal.key_id)
                if stats.remaining <= 0:
                    raise RateLimited(f"the token budget of the key '{principal.name}' is spent",
                                      retry_after=stats.reset_time - time.time())

    def finish(self, ticket: Ticket | None, *, prompt: int = 0, generated: int = 0, embed_inputs: int = 0) -> None:
        """Count a finished request's tokens against the key's windows (one pipeline, which also frees its place
        among the open requests), and into its usage."""
        if ticket is None:
            return
        key = ticket.principal.key_id
        tokens = prompt + generated
        windows = self._token_windows(ticket.principal.limits) if tokens else []
        if windows or ticket.open:
            pipe = self._redis().pipeline()
            names = [self._storage_().prefixed_key(item.key_for(label, key)) for label, item in windows]
            for name in names:
                pipe.incrby(name, tokens)
                pipe.ttl(name)
            if ticket.open:
                pipe.zrem(_open_key(key), ticket.request_id)
                ticket.open = False
            replies = pipe.execute()
            for i, (name, (_, item)) in enumerate(zip(names, windows)):
                if int(replies[2 * i + 1]) < 0:  # a new window: it lasts its period from now, as limits' own
                    self._redis().expire(name, item.get_expiry())
        observe_key_tokens(ticket.principal.name, prompt, generated)
        day = datetime.now(timezone.utc).date().isoformat()
        with self._lock:
            for name, amount in (("requests", 1), ("prompt_tokens", prompt), ("generated_tokens", generated),
                                 ("embed_inputs", embed_inputs)):
                self._pending[(key, day, name)] += amount
        self._start_flusher()

    def release(self, ticket: Ticket | None) -> None:
        """The request ended (or failed) without :meth:`finish`: its place among the key's open requests is free."""
        if ticket is not None and ticket.open:
            self._redis().zrem(_open_key(ticket.principal.key_id), ticket.request_id)
            ticket.open = False

    # -- internals -----------------------------------------------------------------------------------------

    @staticmethod
    def _token_windows(limits: KeyLimits) -> list[tuple[str, Any]]:
        windows: list[tuple[str, Any]] = []
        if limits.tpm:
            windows.append(("tpm", RateLimitItemPerMinute(limits.tpm)))
        if limits.token_budget:
            windows.append(("budget", RateLimitItemPerSecond(limits.token_budget, limits.budget_seconds())))
        return windows

    def _storage_(self) -> RedisStorage:
        """The Redis storage and the two limiters over it, made on first use (the API tier runs without Redis).

        The storage runs over the connection pool of a :func:`~corral.redis_connection.redis_client`, so the
        limits reach Redis as everything else does: the same timeouts, no retries of their own, and through the
        Sentinels for a ``redis+sentinel://`` REDIS_URL (limits' own Sentinel storage takes no database number,
        sends the primary's password to the Sentinels and reads from replicas, which lag).  The URL given beside
        the pool only picks limits' redis-py implementation."""
        if self._storage is None:
            pool = redis_client(self.settings.redis).connection_pool
            self._storage = RedisStorage("redis://", connection_pool=pool, key_prefix=f"{KEY_PREFIX}limits")
            self._moving_limiter = MovingWindowRateLimiter(self._storage)
            self._fixed_limiter = FixedWindowRateLimiter(self._storage)
        return self._storage

    def _moving(self) -> MovingWindowRateLimiter:
        self._storage_()
        return self._moving_limiter

    def _fixed(self) -> FixedWindowRateLimiter:
        self._storage_()
        return self._fixed_limiter

    def _redis(self) -> Any:
        return self._storage_().get_connection()

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            with self._lock:
                if self._flusher is None or not self._flusher.is_alive():
                    self._flusher = threading.Thread(target=self._flush_loop, name="corral-usage", daemon=True)
                    self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # the database restarting, say: the counts wait for the next round
                log.exception("writing key usage failed")

    def flush(self) -> None:
        """Write the usage counted so far to SQL (also before /api/usage answers, so it includes this process's)."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            self.keys.add_usage(pending)
        except Exception:
            with self._lock:
                self._pending.update(pending)
            raise


def _open_key(key_id: str) -> str:
    return f"{KEY_PREFIX}open:{key_id}"
