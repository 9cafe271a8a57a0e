"""Streaming bodies: NDJSON for Ollama's routes, server-sent events for OpenAI's.

One compact JSON object per line, flushed per chunk, no blank lines.  An error after the first byte becomes
a final ``{"error": ...}`` line (the 200 status is already sent).  When the client disconnects, the WSGI
server closes the body iterator; closing propagates down to the gateway, which tells the worker to stop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, stream_with_context

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

    return sse_response(body())


def sse_response(body: Iterator[str]) -> Response:
    """A server-sent event stream of ``body``'s text, neither cached nor buffered by a reverse proxy (the
    OpenAI, Responses and Anthropic streams alike)."""
    resp = Response(stream_with_context(body), mimetype=SSE_MIMETYPE)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


def close_chunks(chunks: Iterator[Any]) -> None:
    close = getattr(chunks, "close", None)  # a generator: closing it tells the worker to stop
    if close is not None:
        close()


class Pump:
    """Reads a chunk iterator on its own thread (in an app context with the request's key, as the gateway
    needs), so a streamed response can write keep-alives (Anthropic's ``ping``, the Responses API's
    ``response.in_progress``) while the worker is silent, as during a long prompt's prefill."""

    def __init__(self, app: Flask, who: Any, chunks: Iterator[dict[str, Any]]) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.quit = threading.Event()
        self.app, self.who, self.chunks = app, who, chunks
        threading.Thread(target=self._run, name="stream-pump", daemon=True).start()

    def _run(self) -> None:
        with self.app.app_context():
            g.principal = self.who
            try:
                for chunk in self.chunks:
                    self.items.put(("chunk", chunk))
                    if self.quit.is_set():
                        break
                self.items.put(("end", None))
            except BaseException as exc:  # handed to the response, which writes it
                self.items.put(("error", exc))
            finally:
                close_chunks(self.chunks)

    def get(self, timeout: float) -> tuple[str, Any] | None:
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            return None

    def prime(self, timeout: float) -> tuple[str, Any] | None:
        """The first item, if it comes within ``timeout``; an error then is raised (its own HTTP status)."""
        first = self.get(timeout)
        if first is not None and first[0] == "error":
            self.quit.set()
            raise first[1]
        return first
