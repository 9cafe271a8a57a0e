"""NDJSON streaming for Ollama's routes.

One compact JSON object per line, flushed per chunk, no blank lines.  An error after the first byte becomes
a final ``{"error": ...}`` line (the 200 status is already sent).  When the client disconnects, the WSGI
server closes the body iterator; closing propagates down to the gateway, which tells the worker to stop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Response, stream_with_context

from api.errors import dumps
from corral.errors import CorralError

log = logging.getLogger(__name__)
NDJSON_MIMETYPE = "application/x-ndjson"


def prime(chunks: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Wait for the first chunk, so that errors before any output get their own HTTP status."""
    return next(chunks)


def ndjson(first: dict[str, Any], rest: Iterator[dict[str, Any]]) -> Response:
    def body() -> Iterator[str]:
        try:
            yield dumps(first) + "\n"
            for chunk in rest:
                yield dumps(chunk) + "\n"
        except CorralError as exc:
            yield dumps({"error": exc.message}) + "\n"
        except Exception as exc:  # never a traceback on the wire
            log.exception("stream failed")
            yield dumps({"error": f"internal error: {type(exc).__name__}"}) + "\n"
        finally:
            close = getattr(rest, "close", None)
            if close is not None:
                close()

    resp = Response(stream_with_context(body()), mimetype=NDJSON_MIMETYPE)
    resp.headers["X-Accel-Buffering"] = "no"  # reverse proxies: do not buffer token streams
    return resp
