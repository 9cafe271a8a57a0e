"""Anthropic's Messages routes (``/v1/messages``, ``/v1/messages/count_tokens``) and its ``/v1/models`` page.

The views parse with :mod:`corral.wire.anthropic`, run the same native chat an Ollama route would (same
gateway, workers and queue, the one request builder), and reshape the reply with its :class:`Reply`.  Errors
under ``/v1/messages`` are Anthropic's (``api.errors`` picks the shape by path).  ``?beta=true`` and
``anthropic-beta`` headers change nothing here.

A streamed reply reads the worker's chunks on a thread of its own, so the response can send ``event: ping``
every :data:`PING_SECONDS` while a long prompt is prefilled: Claude Code gives up on a stream that is silent
for 90 s, and a 19k-token prompt on a CPU takes longer than that.  An error within :data:`PRIME_SECONDS`
(a model that cannot serve the request, a full queue, a key's limit) still gets its own HTTP status; a later
one is an ``event: error``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request

from api.auth import principal
from api.errors import json_response
from api.openapi import SSE, documented
from api.params import query_int
from api.services import services
from api.streaming import Pump, close_chunks, sse_response
from corral.errors import BadRequest, CorralError
from corral.modelstore.store import ModelRecord
from corral.protocol import cancel_key
from corral.timefmt import rfc3339
from corral.wire import responses as R
from corral.wire.anthropic import CountTokensRequest, MessagesRequest, Native, context_cap, parse
from corral.wire.anthropic_reply import Reply, error_of, sse_event
from corral.wire.ollama import decode_json

bp = Blueprint("anthropic", __name__)
log = logging.getLogger(__name__)
PRIME_SECONDS = 5.0
PING_SECONDS = 10.0


def _conversation(req: Any) -> tuple[ModelRecord, Native]:
    """The model and the native chat for a Messages (or count_tokens) body, checked against the model."""
    svc = services().inference
    record = svc.generation_model(req.model, "chat")
    native: Native = req.native(thinks="thinking" in record.capabilities)
    svc.check_generation(record, req.model, "chat", tools=bool(native.plan.tools), images=native.images)
    return record, native


@bp.post("/v1/messages")
@documented(body=MessagesRequest, response=R.AnthropicMessage, stream=SSE)
def create_message() -> Response:
    req: MessagesRequest = parse(MessagesRequest, decode_json(request.get_data()))
    record, native = _conversation(req)
    shared = services()
    cap = context_cap(record, shared.settings.default_num_ctx)
    job = shared.inference.request(
        record, req.model, "chat", messages=native.messages, options=req.options(cap), tools=native.plan.tools,
        format=native.plan.format, think=native.think,
    )
    gateway = shared.gateway

    def stop_worker() -> None:  # a stop sequence was hit, or the client went away: as a disconnect stops it
        gateway.broker.redis.set(cancel_key(job.request_id), b"1", ex=3600)

    estimate = sum(len(str(m.get("content", ""))) for m in native.messages) // 4
    reply = Reply(req.model, req.stops(), native.plan, estimate, stop_worker)
    chunks = shared.inference.generation(job, "chat")
    if not req.stream:
        try:
            for chunk in chunks:
                reply.feed(chunk)
        finally:
            close_chunks(chunks)
        return json_response(reply.message())
    pump = Pump(current_app._get_current_object(), principal(), chunks)  # type: ignore[attr-defined]
    first = pump.prime(PRIME_SECONDS)
    return sse_response(events(reply, pump, first, PING_SECONDS, stop_worker))


def events(reply: Reply, pump: Pump, first: tuple[str, Any] | None, ping: float,
           stop_worker: Any = None) -> Iterator[str]:
    """The stream's SSE text: ``message_start`` at once, then the reply's events, ``ping`` whenever the worker
    has been silent for ``ping`` seconds, an ``error`` event if it fails after the first byte."""
    finished = False
    try:
        yield sse_event(*reply.start())
        item = first
        while True:
            if item is None:
                item = pump.get(ping)
                if item is None:
                    yield sse_event("ping", {"type": "ping"})
                    continue
            kind, value = item
            item = None
            if kind == "error":
                raise value
            if kind == "end":
                finished = True
                return
            for name, data in reply.feed(value):
                yield sse_event(name, data)
    except CorralError as exc:
        yield sse_event("error", error_of(exc))
    except Exception as exc:  # never a traceback on the wire
        log.exception("stream failed")
        yield sse_event("error", error_of(exc))
    finally:
        pump.quit.set()
        if not finished and stop_worker is not None:
            stop_worker()  # the client went away, or the reply failed: the worker stops now, not at its next token


@bp.post("/v1/messages/count_tokens")
@documented(body=CountTokensRequest, response=R.AnthropicTokenCount)
def count_tokens() -> Response:
    """Prompt tokens as the model's own template and tokenizer render the conversation (a worker counts them,
    as a dry run's)."""
    req: CountTokensRequest = parse(CountTokensRequest, decode_json(request.get_data()))
    record, native = _conversation(req)
    count = services().inference.count_chat(record, req.model, native.messages, native.plan.tools, native.think)
    if count is None:
        raise BadRequest("the messages do not render with the model's chat template")
    return json_response({"input_tokens": count})


# -- /v1/models in Anthropic's shape (api/openai.py routes here when the request has anthropic-version) -------


def wants_anthropic() -> bool:
    return "anthropic-version" in request.headers


def model_info(record: ModelRecord, ident: str | None = None) -> dict[str, Any]:
    """Anthropic's ``ModelInfo`` (``lifecycle`` is required by the SDK's type); both token limits are the
    context the model loads with."""
    name = ident or record.name.display
    context = context_cap(record, services().settings.default_num_ctx)
    return {"type": "model", "id": name, "display_name": name, "created_at": rfc3339(record.modified_at),
            "lifecycle": "active", "max_input_tokens": context, "max_tokens": context}


def model_page(records: list[ModelRecord]) -> dict[str, Any]:
    """``{data, has_more, first_id, last_id}``, paged by ``before_id``/``after_id`` and ``limit`` (1-1000)."""
    limit = query_int("limit", 20)
    if limit is None or not 1 <= limit <= 1000:
        raise BadRequest("limit: must be between 1 and 1000")
    data = [model_info(r) for r in records]
    ids = [d["id"] for d in data]
    after, before = request.args.get("after_id"), request.args.get("before_id")
    if after:
        data = data[ids.index(after) + 1:] if after in ids else []
        has_more = len(data) > limit
        data = data[:limit]
    elif before:
        data = data[:ids.index(before)] if before in ids else []
        has_more = len(data) > limit
        data = data[-limit:]
    else:
        has_more = len(data) > limit
        data = data[:limit]
    return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
