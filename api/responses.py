"""OpenAI's Responses API: ``POST /v1/responses`` (JSON or server-sent events), and the stored responses'
``GET``, ``DELETE``, ``GET .../input_items`` and ``POST .../cancel`` (a ``background`` response runs as a durable
job, jobs/responses.py).

A request becomes one native chat request, built as every route's is (``Inference.request``, so
corral/requests.py), from the conversation: the ``previous_response_id`` chain's items (jobs/responses.py), then
the new input (corral/wire/openai_responses.py).  ``tool_choice`` shapes its tools and format
(corral/toolchoice.py).  The reply becomes output items, or the stream's events
(corral/wire/openai_responses_output.py); with ``store`` it is kept, owned by the calling key.  Errors before
the first byte are OpenAI's error object with their status; after it, a ``response.failed`` event.  A stream
reads the worker's chunks on a thread of its own (as the Messages route does), so it can send a keep-alive
while a long prompt is prefilled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, request

from api.auth import creator, owner, principal
from api.errors import dumps, json_response
from api.inference import collect
from api.openapi import SSE, documented
from api.services import services
from api.streaming import Pump, sse_response
from corral.errors import BadRequest
from corral.modelstore.store import ModelRecord
from corral.protocol import cancel_key
from corral.toolchoice import Constrained, ToolChoice
from corral.wire import responses as R
from corral.wire.ollama import decode_json
from corral.wire.openai import parse_request
from corral.wire.openai_responses import ResponsesRequest, conversation, item_body, normalize_items
from corral.wire.openai_responses_output import Draft, stream_events
from jobs.responses import ResponseStore

bp = Blueprint("responses", __name__)
log = logging.getLogger(__name__)
PRIME_SECONDS = 5.0  # an error within this long (no model, a full queue, a key's limit) keeps its HTTP status
KEEPALIVE_SECONDS = 10.0  # then response.in_progress again while the worker is silent (Codex gives up at 300 s)


def _store() -> ResponseStore:
    return ResponseStore(services().settings)


@bp.post("/v1/responses")
@documented(body=ResponsesRequest, response=R.ResponseObject, stream=SSE)
def create() -> Response:
    req: ResponsesRequest = parse_request(ResponsesRequest, decode_json(request.get_data()))
    req.check()
    turn = _Turn.of(req)
    if req.background:
        return _background(req, turn)
    job = services().inference.request(
        turn.record, req.model, "chat", messages=turn.messages, options=req.native_options(), format=turn.plan.format,
        keep_alive=req.keep_alive, tools=turn.plan.tools, think=req.think(), truncate=req.truncate(),
        **req.native_logprobs(),
    )
    chunks = services().inference.generation(job, "chat")
    draft, who = Draft(req), creator()

    def keep(body: dict[str, Any]) -> None:
        if req.store:
            _store().save(body, turn.items, owner=who)

    if not req.stream:
        final = collect(chunks, "chat")
        message = final["message"]
        content, calls = turn.plan.reply(message["content"], message.get("tool_calls") or [])
        body = draft.final(final, content, calls, message.get("thinking", ""), final.get("logprobs") or [])
        try:  # the answer is made (and billed): a database that fails to keep it loses the row, not the answer
            keep(body)
        except Exception:
            log.exception("could not keep response %s", body["id"])
        return json_response(body)
    return _stream(draft, turn.plan, chunks, job.request_id, keep)


@dataclass
class _Turn:
    """A request's new items, the whole conversation as native messages, its tool plan and its model."""

    items: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    plan: Constrained
    record: ModelRecord

    @classmethod
    def of(cls, req: ResponsesRequest) -> _Turn:
        items = normalize_items(req.input)
        history = _store().history(req.previous_response_id, owner()) if req.previous_response_id else []
        messages = conversation([*history, *items], req.instructions)
        plan = ToolChoice.from_openai(req.tool_choice).constrain(req.native_tools(), req.native_format())
        record = services().inference.generation_model(req.model, "chat", think=req.think(), tools=bool(plan.tools),
                                                       images=any(m.get("images") for m in messages))
        return cls(items, messages, plan, record)


def _background(req: ResponsesRequest, turn: _Turn) -> Response:
    """A durable job of one chat item, under the response's id; the client polls ``GET`` for its end."""
    if req.stream:
        raise BadRequest("a background response is not streamed here: poll GET /v1/responses/{id}", param="stream")
    services().governor.check_budget(principal())  # a key whose token budget is spent queues nothing more
    draft, store = Draft(req), _store()
    body = draft.envelope("queued", [])
    # The row first: a save that fails leaves no job running (and billing) behind a 500.  A submit that fails
    # (a full queue, a key's limit) takes the row back, so no response is left queued for ever.
    store.save(body, turn.items, owner=creator())
    try:
        services().jobs.submit(kind="chat", model=req.model, items=[(None, item_body(req, turn.messages, turn.plan))],
                               owner=creator(), job_id=draft.ident, quota=principal())
    except BaseException:
        store.forget(draft.ident)
        raise
    return json_response(body)


def _stream(draft: Draft, plan: Constrained, chunks: Iterator[dict[str, Any]], request_id: str,
            keep: Callable[[dict[str, Any]], None]) -> Response:
    gateway = services().gateway

    def stop_worker() -> None:  # the client went away while the worker was silent: it stops now
        gateway.broker.redis.set(cancel_key(request_id), b"1", ex=3600)

    pump = Pump(current_app._get_current_object(), principal(), chunks)  # type: ignore[attr-defined]
    first = pump.prime(PRIME_SECONDS)  # an error before any output keeps its own status
    return _sse(stream_events(draft, _ticking(pump, first, stop_worker), plan, keep))


def _ticking(pump: Pump, first: tuple[str, Any] | None, stop_worker: Callable[[], None]) -> Iterator[dict[str, Any] | None]:
    """The pump's chunks, and ``None`` whenever the worker has been silent for :data:`KEEPALIVE_SECONDS`."""
    finished = False
    item = first
    try:
        while True:
            if item is None:
                item = pump.get(KEEPALIVE_SECONDS)
                if item is None:
                    yield None
                    continue
            kind, value = item
            item = None
            if kind == "error":
                finished = True
                raise value
            if kind == "end":
                finished = True
                return
            finished = bool(value.get("done"))
            yield value
    finally:
        pump.quit.set()
        if not finished:
            stop_worker()


def _sse(events: Iterator[dict[str, Any]]) -> Response:
    """The Responses stream: ``event: <type>`` and ``data: <json>`` per event, no ``[DONE]`` (the terminal event
    ends it; stream_events turns any failure into ``response.failed``)."""
    def body() -> Iterator[str]:
        try:
            for event in events:
                yield f"event: {event['type']}\ndata: {dumps(event)}\n\n"
        finally:
            events.close()  # type: ignore[attr-defined]

    return sse_response(body())


@bp.post("/v1/responses/input_tokens")
@documented(body=ResponsesRequest, response=R.InputTokens)
def input_tokens() -> Response:
    """The prompt tokens a request would take, as the model's own template and tokenizer render its whole
    conversation (a worker counts them, as for ``/v1/messages/count_tokens``)."""
    req: ResponsesRequest = parse_request(ResponsesRequest, decode_json(request.get_data()))
    req.check()
    turn = _Turn.of(req)
    count = services().inference.count_chat(turn.record, req.model, turn.messages, turn.plan.tools, req.think())
    if count is None:
        raise BadRequest("the input does not render with the model's chat template", param="input")
    return json_response({"object": "response.input_tokens", "input_tokens": count})


@bp.get("/v1/responses/<response_id>")
@documented(response=R.ResponseObject, query=(("include[]", "string"), ("stream", "boolean")))
def retrieve(response_id: str) -> Response:
    if request.args.get("stream", "false").lower() == "true":
        raise BadRequest("a stored response is not streamed again here: GET it whole", param="stream")
    return json_response(_store().get(response_id, owner()))


@bp.delete("/v1/responses/<response_id>")
@documented(response=R.ResponseDeleted)
def delete(response_id: str) -> Response:
    return json_response(_store().delete(response_id, owner(), services().jobs))


@bp.post("/v1/responses/<response_id>/cancel")
@documented(response=R.ResponseObject)
def cancel(response_id: str) -> Response:
    return json_response(_store().cancel(response_id, owner(), services().jobs))


@bp.get("/v1/responses/<response_id>/input_items")
@documented(response=R.InputItemList, query=(("after", "string"), ("limit", "integer"), ("order", "string")))
def input_items(response_id: str) -> Response:
    try:
        limit = int(request.args.get("limit", "20"))
    except ValueError as exc:
        raise BadRequest("limit must be an integer", param="limit") from exc
    page = _store().input_items(response_id, owner(), after=request.args.get("after") or None, limit=limit,
                                order=request.args.get("order", "desc"))
    return json_response(page)
