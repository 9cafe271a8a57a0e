"""Error rendering, one handler per wire format, and the JSON response helper.

Ollama's native routes answer ``{"error": "<message>"}`` with ``application/json; charset=utf-8``.  Routing
errors keep Ollama's texts (``404 page not found``, ``405 method not allowed``) but in the same JSON shape,
so no client ever sees HTML or a traceback.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from corral.errors import CorralError

log = logging.getLogger(__name__)
JSON_MIMETYPE = "application/json; charset=utf-8"


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status=status, mimetype=JSON_MIMETYPE)


def ollama_error(message: str, status: int) -> Response:
    return json_response({"error": message}, status)


_HTTP_TEXT = {404: "404 page not found", 405: "405 method not allowed"}


def init_app(app: Flask) -> None:
    """Register the Ollama-shaped handlers (the default for every route family without its own)."""

    @app.errorhandler(CorralError)
    def _corral(exc: CorralError) -> Response:
        return ollama_error(exc.message, exc.status_code)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = _HTTP_TEXT.get(status) or (exc.description or exc.name)
        resp = ollama_error(message, status)
        if status == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return ollama_error(f"internal error: {type(exc).__name__}", 500)
