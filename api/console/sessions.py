"""Console sign-in and CSRF: a random session id in an HttpOnly, SameSite=Strict cookie, its state in Redis.

The session keeps the sha256 of the API key it signed in with (never the key itself), so a revoked key ends
every console session on its next request, exactly as it ends API access, and every API process behind one
Redis knows every session.  Each session carries its own CSRF token: every state-changing form posts it back
and :func:`check_csrf` compares it in constant time (the synchronizer-token pattern).  A session exists even
when keys are off, so the forms are protected there too.  Flask's signed-cookie session would need one secret
shared by every API process, and would keep the key hash in the browser; this needs neither.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from flask import request
from werkzeug.wrappers import Response

from corral.broker import Broker
from corral.errors import Forbidden
from corral.protocol import KEY_PREFIX

COOKIE = "corral_console"
TTL_SECONDS = 12 * 3600  # a working day; every request renews it


@dataclass
class ConsoleSession:
    sid: str
    csrf: str
    key_hash: str | None = None
    new: bool = False


def _redis_key(sid: str) -> str:
    # Redis sees the id's hash only: a leaked Redis dump cannot be replayed as a cookie.
    return f"{KEY_PREFIX}console:{hashlib.sha256(sid.encode()).hexdigest()}"


class ConsoleSessions:
    """Console sessions in the broker's Redis (reached on first use, as every Redis client of the API)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @property
    def redis(self) -> Any:
        return self.broker.redis

    def current(self) -> ConsoleSession:
        """The request's session, or a new one (sent with the response by :meth:`save`)."""
        sid = request.cookies.get(COOKIE, "")
        if sid:
            raw = self.redis.get(_redis_key(sid))
            if raw is not None:
                data = json.loads(raw)
                return ConsoleSession(sid, data["csrf"], data.get("key_hash"))
        return ConsoleSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), new=True)

    def save(self, session: ConsoleSession, response: Response) -> None:
        """Store (and renew) the session, and set its cookie: HttpOnly, SameSite=Strict, Secure over HTTPS."""
        body = json.dumps({"csrf": session.csrf, "key_hash": session.key_hash})
        self.redis.set(_redis_key(session.sid), body, ex=TTL_SECONDS)
        response.set_cookie(
            COOKIE, session.sid, max_age=TTL_SECONDS, path="/ui", httponly=True, samesite="Strict",
            secure=request.is_secure,
        )

    def sign_in(self, session: ConsoleSession, key_hash: str) -> ConsoleSession:
        """A new session id and CSRF token on sign-in (no fixation): the old id is dropped."""
        self.redis.delete(_redis_key(session.sid))
        return ConsoleSession(secrets.token_urlsafe(32), secrets.token_urlsafe(32), key_hash, new=True)

    def sign_out(self, session: ConsoleSession, response: Response) -> None:
        self.redis.delete(_redis_key(session.sid))
        response.delete_cookie(COOKIE, path="/ui")


def check_csrf(session: ConsoleSession) -> None:
    """A state-changing request must carry the session's token (form field ``csrf`` or header ``X-CSRF-Token``)
    and, when the browser sends one, an ``Origin`` of this server."""
    sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
    if session.new or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise Forbidden("the form has expired or did not come from this console: reload the page and try again")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and origin.rstrip("/") != request.host_url.rstrip("/"):
        raise Forbidden(f"cross-site request from {origin} refused")
