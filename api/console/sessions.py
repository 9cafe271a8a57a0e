"""Console sign-in and CSRF: a session exists only once someone signs in, and an anonymous page stores nothing.

Signed in (keys required): a random session id in an HttpOnly, SameSite=Strict cookie, its state in Redis.  The
session keeps the sha256 of the API key it signed in with (never the key itself), so a revoked key ends every
console session on its next request, exactly as it ends API access, and every API process behind one Redis knows
every session.  It carries its own CSRF token, which every state-changing form posts back and
:func:`check_csrf` compares in constant time (the synchronizer-token pattern).

Not signed in (the sign-in form itself, and every page when keys are off): nothing is written anywhere on the
server, so no one can grow Redis by loading ``/ui`` without a key.  The CSRF token lives in its own HttpOnly,
SameSite=Strict cookie and the form posts it back (the double-submit pattern); a cross-site form cannot read the
cookie to copy it, and :func:`check_csrf` also refuses requests whose ``Origin`` or ``Sec-Fetch-Site`` says they
came from another site, which covers a sibling site that could plant a cookie.  Flask's signed-cookie session
would need one secret shared by every API process, and would keep the key hash in the browser; this needs
neither.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from flask import request
from werkzeug.wrappers import Response

from corral.broker import Broker
from corral.errors import Forbidden
from corral.protocol import KEY_PREFIX

COOKIE = "corral_console"
CSRF_COOKIE = "corral_console_csrf"
TTL_SECONDS = 12 * 3600  # a working day; every request renews it
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)


@dataclass
class ConsoleSession:
    """The request's session: ``stored`` once signed in (kept in Redis under ``sid``), else anonymous, with
    only its CSRF token (in its own cookie).  ``new``: the token was made for this request (no cookie came with
    it), so nothing the request posts can carry it yet."""

    sid: str
    csrf: str
    key_hash: str | None = None
    new: bool = False
    stored: bool = False


def _redis_key(sid: str) -> str:
    # Redis sees the id's hash only: a leaked Redis dump cannot be replayed as a cookie.
    return f"{KEY_PREFIX}console:{hashlib.sha256(sid.encode()).hexdigest()}"


def _token() -> str:
    return secrets.token_urlsafe(32)


def _anonymous() -> ConsoleSession:
    """A request without a session: the CSRF token its cookie brought, or a new one."""
    sent = request.cookies.get(CSRF_COOKIE, "")
    return ConsoleSession("", sent) if _TOKEN.match(sent) else ConsoleSession("", _token(), new=True)


class ConsoleSessions:
    """Console sessions in the broker's Redis (reached on first use, as every Redis client of the API)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @property
    def redis(self) -> Any:
        return self.broker.redis

    def current(self) -> ConsoleSession:
        """The request's signed-in session, or an anonymous one: a read of Redis at most, never a write."""
        sid = request.cookies.get(COOKIE, "")
        if sid:
            raw = self.redis.get(_redis_key(sid))
            if raw is not None:
                data = json.loads(raw)
                return ConsoleSession(sid, data["csrf"], data.get("key_hash"), stored=True)
        return _anonymous()

    def save(self, session: ConsoleSession, response: Response) -> None:
        """Renew a signed-in session in Redis and set its cookie; for an anonymous one, set the CSRF cookie only
        (and drop a session cookie that outlived its session).  Cookies: HttpOnly, SameSite=Strict, Secure over
        HTTPS, for ``/ui`` only."""
        if session.stored:
            body = json.dumps({"csrf": session.csrf, "key_hash": session.key_hash})
            self.redis.set(_redis_key(session.sid), body, ex=TTL_SECONDS)
            self._cookie(response, COOKIE, session.sid)
            return
        if request.cookies.get(COOKIE):
            response.delete_cookie(COOKIE, path="/ui")
        if session.new or request.cookies.get(CSRF_COOKIE) != session.csrf:
            self._cookie(response, CSRF_COOKIE, session.csrf)

    @staticmethod
    def _cookie(response: Response, name: str, value: str) -> None:
        response.set_cookie(name, value, max_age=TTL_SECONDS, path="/ui", httponly=True, samesite="Strict",
                            secure=request.is_secure)

    def sign_in(self, session: ConsoleSession, key_hash: str) -> ConsoleSession:
        """The session starts here: a new id and CSRF token (no fixation; an old session's id is dropped)."""
        if session.stored:
            self.redis.delete(_redis_key(session.sid))
        return ConsoleSession(_token(), _token(), key_hash, new=True, stored=True)

    def end(self, session: ConsoleSession) -> ConsoleSession:
        """Drop a signed-in session (its key was revoked); the request goes on anonymous."""
        self.redis.delete(_redis_key(session.sid))
        return _anonymous()

    def sign_out(self, session: ConsoleSession, response: Response) -> None:
        if session.stored:
            self.redis.delete(_redis_key(session.sid))
        response.delete_cookie(COOKIE, path="/ui")


def check_csrf(session: ConsoleSession) -> None:
    """A state-changing request must carry the session's token (form field ``csrf`` or header ``X-CSRF-Token``)
    and must not say it came from another site (``Origin``, and ``Sec-Fetch-Site``, which browsers send and
    page scripts cannot change)."""
    sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token") or ""
    if session.new or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise Forbidden("the form has expired or did not come from this console: reload the page and try again")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and origin.rstrip("/") != request.host_url.rstrip("/"):
        raise Forbidden(f"cross-site request from {origin} refused")
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        raise Forbidden("cross-site request refused")
