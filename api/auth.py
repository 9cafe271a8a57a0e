"""API keys and body limits, checked before any view runs.

With ``CORRAL_REQUIRE_API_KEY=1`` every route but ``/`` (the liveness probe) needs ``Authorization: Bearer
<key>`` or ``x-api-key: <key>`` (ollama-python sends ``OLLAMA_API_KEY`` the first way, openai-python its
``api_key``, the anthropic SDK either; the console under
``/ui`` keeps a signed-in session instead); a missing, unknown or
revoked key is a 401 in the route family's error shape, and changing the shared models with a key that is not
an admin's is a 403 (:func:`require_admin`).  Views ask :func:`owner` whose jobs, batches and files
the caller may see (``None``: all of them) and :func:`creator` whom to stamp as owner of what it creates.

Body limits: ``CORRAL_MAX_BODY`` on the sync routes; job and file uploads, which are streamed into the
database, get ``CORRAL_UPLOAD_LIMIT`` instead, and blob uploads (model files, streamed to disk) none.  Over the
limit is a 413, before the body is read.
"""

from __future__ import annotations

from flask import Flask, current_app, g, request

from corral.errors import Forbidden, PayloadTooLarge, Unauthorized
from corral.settings import Settings
from jobs.keys import KeyStore, Principal

UPLOAD_ROUTES = {("POST", "/api/jobs"), ("POST", "/v1/files")}
# A JSON job body is parsed whole, so it keeps the sync limit; larger jobs are streamed as JSONL.
JSON_TYPES = {"application/json", ""}
OPEN_ROUTES = {"/"}


def init_app(app: Flask, settings: Settings, keys: KeyStore) -> None:
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body

    @app.before_request
    def _limits_and_key() -> None:
        if (request.method, request.path) in UPLOAD_ROUTES and request.mimetype not in JSON_TYPES:
            request.max_content_length = settings.upload_limit
        elif request.method == "POST" and request.path.startswith("/api/blobs/"):
            request.max_content_length = 1 << 62  # a model file: streamed to disk, checked against its digest
        elif request.path == "/api/jobs" and (request.content_length or 0) > settings.max_body:
            raise PayloadTooLarge(
                f"a JSON job body may be at most {settings.max_body} bytes: upload larger jobs as JSONL "
                "(Content-Type: application/x-ndjson, one request body per line; `corral submit` does this)"
            )
        g.principal = None
        if not settings.require_api_key or request.path in OPEN_ROUTES or request.method == "OPTIONS":
            return
        if request.path == "/ui" or request.path.startswith("/ui/"):
            return  # the operator console signs in with a key once and keeps a session (api/console/sessions.py)
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        # Anthropic's clients send the key as x-api-key (ANTHROPIC_API_KEY), or as a bearer token
        # (ANTHROPIC_AUTH_TOKEN), or both: either one that is a valid key lets the request in.
        offered = [k for k in (key.strip() if scheme.lower() == "bearer" else "",
                               request.headers.get("X-Api-Key", "").strip()) if k]
        if not offered:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        principal = next((p for p in map(keys.check, offered) if p is not None), None)
        if principal is None:
            raise Unauthorized("invalid API key")
        g.principal = principal


def principal() -> Principal | None:
    found: Principal | None = g.get("principal")
    return found


def require_admin(what: str) -> None:
    """With keys required, only an admin key may change what every user shares: the models (create, copy,
    delete, pull, push) and which of them are loaded (unloading with ``keep_alive: 0``)."""
    who = principal()
    if who is not None and not who.admin:
        raise Forbidden(f"{what} needs an admin key: models are shared by every user of this server")


def refuse_if_read_only(what: str) -> None:
    """``CORRAL_READ_ONLY=1``: the models stay as they are (no create, pull, copy, delete, upload); inference and
    jobs go on."""
    if current_app.extensions["corral"].settings.read_only:
        raise Forbidden(f"{what} is refused: this server is read-only (CORRAL_READ_ONLY)")


def owner() -> str | None:
    """Whose resources the caller sees: its own key id, or None (keys off, or an admin key) for all."""
    who = principal()
    return None if who is None or who.admin else who.key_id


def creator() -> str | None:
    """Whom new jobs, batches and files belong to: the calling key (None when keys are off)."""
    who = principal()
    return who.key_id if who else None
