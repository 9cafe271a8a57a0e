"""Streaming bodies: NDJSON for Ollama's routes, server-sent events for OpenAI's.

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
from corral.wire.openai import error_body

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


SSE_MIMETYPE = "text/event-stream"


def sse(events: Iterator[dict[str, Any]]) -> Response:
    """OpenAI's server-sent events: ``data: <json>`` per event, then ``data: [DONE]``.

    An error after the first byte becomes an ``error`` event (openai-python raises it as an APIError) and the
    stream ends without ``[DONE]``.
    """
    def body() -> Iterator[str]:
        try:
            for event in events:
                yield f"data: {dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        except CorralError as exc:
            yield f"data: {dumps(error_body(exc.message, exc.openai_type, exc.param, exc.code))}\n\n"
        except Exception as exc:  # never a traceback on the wire
            log.exception("stream failed")
            yield f"data: {dumps(error_body(f'internal error: {type(exc).__name__}', 'api_error'))}\n\n"
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    resp = Response(stream_with_context(body()), mimetype=SSE_MIMETYPE)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
