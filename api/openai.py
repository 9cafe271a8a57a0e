"""OpenAI's sync routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``).

Each view parses the body with :mod:`corral.wire.openai`, runs the same native request an Ollama route would
(same gateway, same workers, same queue), and reshapes the reply (streams through
:func:`corral.wire.openai.stream_chunks`).  Errors render as OpenAI's error object
(``api.errors`` picks the shape by path).
"""

from __future__ import annotations

import itertools
from typing import Any

from flask import Blueprint, Response, request

from api import anthropic
from api.auth import principal
from api.errors import json_response
from api.inference import EMBED_NOT_FOUND, collect
from api.openapi import SSE, documented
from api.services import services
from api.streaming import prime, sse
from corral.errors import BadRequest, ModelNotFound
from corral.modelstore.store import ModelName, ModelRecord
from corral.wire import responses as R
from corral.wire.ollama import decode_json
from corral.wire.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_completion,
    embedding_list,
    model_object,
    parse_request,
    stream_chunks,
    text_completion,
)

bp = Blueprint("openai", __name__)


def _body(model: type[Any]) -> Any:
    req = parse_request(model, decode_json(request.get_data()))
    if not req.model:
        raise BadRequest("model is required", param="model")
    return req


@bp.post("/v1/chat/completions")
@documented(body=ChatCompletionRequest, response=R.ChatCompletion, stream=SSE)
def chat_completions() -> Response:
    req: ChatCompletionRequest = _body(ChatCompletionRequest)
    svc = services().inference
    messages = req.native_messages()
    record = svc.generation_model(req.model, "chat", think=req.think(), tools=bool(req.tools),
                                  images=any(m.get("images") for m in messages))
    job = svc.request(
        record, req.model, "chat", messages=messages, options=req.native_options(),
        format=req.native_format(), keep_alive=req.keep_alive, tools=req.tools or None, think=req.think(),
        **req.native_logprobs(),
    )
    chunks = svc.generation(job, "chat")
    if not req.stream:
        final = collect(chunks, "chat")
        return json_response(
            chat_completion(
                req.model, final["message"]["content"], final.get("done_reason"),
                int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)),
                tool_calls=final["message"].get("tool_calls"), reasoning=final["message"].get("thinking"),
                logprobs=final.get("logprobs"),
            )
        )
    first = prime(chunks)
    return sse(stream_chunks("chat", req.model, req.include_usage, itertools.chain([first], chunks)))


@bp.post("/v1/completions")
@documented(body=CompletionRequest, response=R.Completion, stream=SSE)
def completions() -> Response:
    req: CompletionRequest = _body(CompletionRequest)
    svc = services().inference
    record = svc.generation_model(req.model, "generate")
    if req.suffix and "insert" not in record.capabilities:
        raise BadRequest(f"{ModelName.parse(req.model).display} does not support insert", param="suffix")
    job = svc.request(
        record, req.model, "generate", prompt=req.prompt, suffix=req.suffix or None, options=req.native_options(),
        keep_alive=req.keep_alive,
        **req.native_logprobs(),
    )
    chunks = svc.generation(job, "generate")
    if not req.stream:
        final = collect(chunks, "generate")
        return json_response(
            text_completion(
                req.model, final["response"], final.get("done_reason"),
                int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)),
                logprobs=final.get("logprobs"),
            )
        )
    first = prime(chunks)
    return sse(stream_chunks("generate", req.model, req.include_usage, itertools.chain([first], chunks)))


@bp.post("/v1/embeddings")
@documented(body=EmbeddingRequest, response=R.EmbeddingList)
def embeddings() -> Response:
    req: EmbeddingRequest = _body(EmbeddingRequest)
    inputs, encoding = req.inputs(), req.encoding()
    svc = services().inference
    record = svc.model(req.model, not_found=EMBED_NOT_FOUND)
    job = svc.request(
        record, req.model, "embed", inputs=inputs, truncate=True, dimensions=req.dimensions, options=req.options,
        keep_alive=req.keep_alive,
    )
    data, _ = svc.single(job)
    return json_response(embedding_list(req.model, data["embeddings"], encoding, int(data["prompt_eval_count"])))


def _model_object(record: ModelRecord, ident: str | None = None) -> dict[str, Any]:
    return model_object(ident or record.name.display, int(record.modified_at.timestamp()), record.name.namespace)


@bp.get("/v1/models")
@documented(response=R.ModelList)
def list_models() -> Response:
    shared = services()
    records = [r for r in shared.store.list() if shared.governor.allowed(principal(), r.name.display)]
    if anthropic.wants_anthropic():  # the Anthropic SDK (and Claude Code's model discovery) send anthropic-version
        return json_response(anthropic.model_page(records))
    return json_response({"object": "list", "data": [_model_object(r) for r in records] or None})


@bp.get("/v1/models/<model>")
@documented(response=R.ModelObject)
def get_model(model: str) -> Response:
    try:
        record = services().inference.store.get(model)
    except (ModelNotFound, BadRequest) as exc:
        try:
            shown = ModelName.parse(model).display
        except BadRequest:
            shown = model
        raise ModelNotFound(f"model '{shown}' not found") from exc
    services().governor.check_model(principal(), model)
    if anthropic.wants_anthropic():
        return json_response(anthropic.model_info(record, model))
    return json_response(_model_object(record, model))
