"""Error rendering, one renderer per wire format, and the JSON response helper.

Ollama's native routes answer ``{"error": "<message>"}`` with ``application/json; charset=utf-8``.  Routing
errors keep Ollama's texts (``404 page not found``, ``405 method not allowed``) but in the same JSON shape,
so no client ever sees HTML or a traceback.  Everything under ``/v1/`` answers OpenAI's
``{"error": {"message", "type", "param", "code"}}`` instead, with the type each error class carries; so do
llama.cpp's rerank aliases outside ``/v1/`` (``/rerank``, ``/reranking``), as llama.cpp's server answers them.
Cohere's ``/v2/`` routes answer Cohere's ``{"message": "..."}``, and Anthropic's under ``/v1/messages`` (and an
Anthropic client's ``/v1/models``) ``{"type": "error", "error": {"type", "message"}}`` with its types per status.

Outages are 503s with ``Retry-After`` in those shapes, never a 500: Redis out of reach
(:class:`~corral.errors.BrokerUnavailable`) and the job database restarting or out of reach
(:class:`~corral.errors.DatabaseUnavailable`, told apart from a query's own failure by :func:`jobs.db.unreachable`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response, request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from corral.broker import UNREACHABLE
from corral.errors import BrokerUnavailable, CorralError, DatabaseUnavailable, RateLimited
from corral.wire.anthropic_reply import error_body as anthropic_body
from corral.wire.openai import error_body
from jobs.db import reason, unreachable

log = logging.getLogger(__name__)
JSON_MIMETYPE = "application/json; charset=utf-8"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status=status, mimetype=JSON_MIMETYPE)


def ollama_error(message: str, status: int) -> Response:
    return json_response({"error": message}, status)


def openai_error(message: str, status: int, kind: str | None = None, param: str | None = None,
                 code: str | None = None) -> Response:
    if kind is None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return Response(dumps(error_body(message, kind, param, code)), status=status, mimetype="application/json")


LLAMA_SERVER_PATHS = ("/rerank", "/reranking")


def is_openai_path() -> bool:
    return request.path.startswith("/v1/") or request.path in LLAMA_SERVER_PATHS


def is_anthropic_path() -> bool:
    """Anthropic's routes, and ``/v1/models`` asked for by an Anthropic client (it sends ``anthropic-version``)."""
    return request.path.startswith("/v1/messages") or (
        request.path.startswith("/v1/models") and "anthropic-version" in request.headers)


def anthropic_error(message: str, status: int) -> Response:
    return Response(dumps(anthropic_body(message, status)), status=status, mimetype="application/json")


def is_cohere_path() -> bool:
    return request.path.startswith("/v2/")


def cohere_error(message: str, status: int) -> Response:
    return json_response({"message": message}, status)


def render_error(exc: CorralError) -> Response:
    """A typed error in the wire shape of the route family that raised it (a 429 or an outage's 503 with its
    ``Retry-After``)."""
    if is_anthropic_path():
        resp = anthropic_error(exc.message, exc.status_code)
    elif is_openai_path():
        resp = openai_error(exc.message, exc.status_code, exc.openai_type, exc.param, exc.code)
    elif is_cohere_path():
        resp = cohere_error(exc.message, exc.status_code)
    else:
        resp = ollama_error(exc.message, exc.status_code)
    if isinstance(exc, (RateLimited, BrokerUnavailable, DatabaseUnavailable)):
        resp.headers["Retry-After"] = str(exc.retry_after)
    return resp


def plain_error(message: str, status: int) -> Response:
    """An untyped error (routing, an unexpected exception) in the route family's shape."""
    if is_anthropic_path():
        return anthropic_error(message, status)
    if is_openai_path():
        return openai_error(message, status)
    if is_cohere_path():
        return cohere_error(message, status)
    return ollama_error(message, status)


_HTTP_TEXT = {404: "404 page not found", 405: "405 method not allowed", 413: "request body too large"}


def init_app(app: Flask) -> None:
    """Register the handlers: Ollama's shape by default, OpenAI's under ``/v1/``."""

    @app.errorhandler(CorralError)
    def _corral(exc: CorralError) -> Response:
        return render_error(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = _HTTP_TEXT.get(status) or (exc.description or exc.name)
        resp = plain_error(message, status)
        if status == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return resp

    def _broker(exc: Exception) -> Response:
        """Redis out of reach on any route (the broker, the token streams, a job's dispatch): a 503 with
        ``Retry-After``, not a 500."""
        log.warning("Redis unreachable while serving %s: %s", request.path, exc)
        return render_error(BrokerUnavailable(exc))

    for redis_error in UNREACHABLE:
        app.register_error_handler(redis_error, _broker)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return plain_error(f"internal error: {type(exc).__name__}", 500)

    @app.errorhandler(PoolTimeout)
    def _pool_full(exc: PoolTimeout) -> Response:
        """Every connection of a pool busy for the pool's whole wait (a database that answers slowly, connects
        that hang, a burst of polls): the database is out of reach for this request, as a 503 says, not a 500."""
        log.warning("no database connection came free while serving %s: %s", request.path, exc)
        return render_error(DatabaseUnavailable("every connection busy"))

    @app.errorhandler(DBAPIError)
    def _database(exc: DBAPIError) -> Response:
        """The job database restarting or out of reach (refused, the session ended by its shutdown, "the
        database system is starting up"): a 503 with ``Retry-After``; any other database error stays a 500."""
        if not unreachable(exc):
            return _unexpected(exc)
        log.warning("the database is unreachable while serving %s: %s", request.path, reason(exc))
        return render_error(DatabaseUnavailable(reason(exc)))
