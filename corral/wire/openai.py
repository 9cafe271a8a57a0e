"""OpenAI's request and response shapes, and their translation to and from corral's native (Ollama) requests.

Shared by the sync ``/v1`` routes and the OpenAI Batch API, so a batch line is turned into the same native
request as the same body sent to ``/v1/chat/completions``, and its stored result is rendered into the same
``chat.completion`` object; :func:`stream_chunks` turns a native token stream into OpenAI's stream chunks.
Defaults follow Ollama's OpenAI layer (``temperature`` and ``top_p`` 1.0 when
absent, ``max_tokens`` -> ``num_predict``); beyond Ollama, ``options`` and ``keep_alive`` in the body are
honoured (explicit OpenAI fields win over ``options``).
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.errors import BadRequest
from corral.images import decode
from corral.options import RuntimeRequest, parse_options
from corral.thinking import think_from_effort
from corral.toolcalls import openai_tool_calls
from corral.wire.ollama import check_embed_count, check_schema_budget

FINGERPRINT = "fp_ollama"


class _OpenAIRequest(RuntimeRequest):
    """OpenAI bodies take Ollama's ``options`` and ``keep_alive`` too (corral's extension)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(_OpenAIRequest):
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def native_options(self) -> dict[str, Any]:
        """Ollama options: OpenAI's defaults, then the body's ``options``, then the explicit OpenAI fields."""
        opts: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, **self.options}
        explicit = {
            "num_predict": self.max_tokens,
            "seed": self.seed,
            "temperature": self.temperature,
            "top_p": self.top_p or None,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        }
        opts.update({k: v for k, v in explicit.items() if v is not None})
        if self.stop is not None:
            opts["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return parse_options(opts)  # the OpenAI fields get the same bounds as Ollama's options


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}]},
    )

    messages: list[dict[str, Any]] = Field(default_factory=list)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    reasoning: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 20:
            raise BadRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
        return value

    def native_logprobs(self) -> dict[str, Any]:
        """``logprobs`` and ``top_logprobs`` as the native request takes them."""
        return {"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0} if self.logprobs else {}

    def native_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise BadRequest("[] is too short - 'messages'", param="messages")
        out: list[dict[str, Any]] = []
        for message in self.messages:
            out.extend(_native_message(message))
        return out

    def native_format(self) -> str | dict[str, Any] | None:
        fmt = self.response_format
        if not fmt:
            return None
        kind = fmt.get("type")
        if kind == "json_object":
            return "json"
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequest("response_format.json_schema.schema must be an object", param="response_format")
            try:
                check_schema_budget(schema)
            except BadRequest as exc:
                raise BadRequest(exc.message, param="response_format") from exc
            return schema
        if kind in (None, "text"):
            return None
        raise BadRequest(f"invalid response_format type: {kind}", param="response_format")

    def think(self) -> bool | str | None:
        """``reasoning_effort`` (or ``reasoning.effort``) as Ollama's think value."""
        effort = self.reasoning_effort if self.reasoning_effort is not None else (self.reasoning or {}).get("effort")
        return think_from_effort(effort)


class CompletionRequest(_Sampling):
    """POST /v1/completions (``prompt`` is a string only, as in Ollama)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"model": "smollm2", "prompt": "Once"}]})

    prompt: str = ""
    suffix: str | None = None
    logprobs: int | None = Field(None, description="Log-probabilities of each token and this many alternatives (0-20).")

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 20:
            raise BadRequest("logprobs must be between 0 and 20", param="logprobs")
        return value

    def native_logprobs(self) -> dict[str, Any]:
        """The legacy ``logprobs: n`` as Ollama's OpenAI layer reads it: on, with n alternatives, when n > 0."""
        return {"logprobs": True, "top_logprobs": self.logprobs} if self.logprobs else {}
    stop: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if isinstance(value, list):
            for s in value:
                if not isinstance(s, str):
                    raise BadRequest(f"invalid type for 'stop' field: {_go_kind(s)}", param="stop")
        elif value is not None and not isinstance(value, str):
            raise BadRequest(f"invalid type for 'stop' field: {_go_kind(value)}", param="stop")
        return value


class EmbeddingRequest(_OpenAIRequest):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"model": "all-minilm", "input": "hi"}]})

    input: Any = None
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)

    def inputs(self) -> list[str]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
            try:
                check_embed_count(value)
            except BadRequest as exc:
                raise BadRequest(exc.message, param="input") from exc
            return list(value)
        raise BadRequest("invalid input", param="input")

    def encoding(self) -> Literal["float", "base64"]:
        fmt = (self.encoding_format or "float").lower()
        if fmt not in ("float", "base64"):
            raise BadRequest(
                f"Invalid value for 'encoding_format' = {self.encoding_format}. Supported values: ['float', 'base64'].",
                param="encoding_format",
            )
        return fmt  # type: ignore[return-value]


def _go_kind(value: Any) -> str:
    return {bool: "bool", int: "float64", float: "float64", dict: "map[string]interface {}"}.get(type(value), "string")


def _native_message(message: Any) -> list[dict[str, Any]]:
    """One OpenAI message -> one or more native messages (each content part becomes its own, same role)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest("invalid message: each message needs a string 'role'", param="messages")
    role = message["role"].lower()
    content = message.get("content")
    base: dict[str, Any] = {"role": role}
    if role == "tool":
        name = message.get("name") or message.get("tool_call_id")
        if name:
            base["name"] = base["tool_name"] = name  # Jinja templates' message.name; Go templates' .ToolName
        if message.get("tool_call_id"):
            base["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("reasoning"), str) and message["reasoning"]:
        base["thinking"] = message["reasoning"]  # an assistant turn's reasoning, as Ollama's OpenAI layer maps it
    if message.get("tool_calls"):
        base["tool_calls"] = [_native_tool_call(c) for c in message["tool_calls"]]
    if content is None or isinstance(content, str):
        return [{**base, "content": content or ""}]
    if not isinstance(content, list):
        raise BadRequest("invalid message content type", param="messages")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append({**base, "content": str(part.get("text", ""))})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url", "") if isinstance(ref, dict) else str(ref or "")
            out.append({**base, "content": "", "images": [image_data(url)]})  # its own message, as Ollama's
        elif kind == "input_audio":
            raise BadRequest("this model does not support audio input")
        else:
            raise BadRequest(f"invalid message part type: {kind}", param="messages")
    return out


IMAGE_DATA_PREFIXES = ("data:;base64,", *(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp")))


def image_data(url: str) -> str:
    """An ``image_url``'s base64 payload, as Ollama's OpenAI layer takes it (``decodeImageURL``): a data URL of a
    JPEG, PNG or WebP image (or of no stated type); remote URLs are not fetched."""
    if url.startswith(("http://", "https://")):
        raise BadRequest("image URLs are not currently supported, please use base64 encoded data instead")
    prefix = next((p for p in IMAGE_DATA_PREFIXES if url.startswith(p)), None)
    if prefix is None:
        raise BadRequest("invalid image input")
    data = url[len(prefix):]
    try:
        decode(data)
    except BadRequest as exc:
        raise BadRequest("invalid image input") from exc
    return data


def _native_tool_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise BadRequest("invalid tool call", param="messages")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as exc:
        raise BadRequest("invalid tool call arguments", param="messages") from exc
    return {"function": {"name": function.get("name", ""), "arguments": parsed}}


def parse_request(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded body; pydantic's complaint becomes a 400 naming the field."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"invalid value for '{field}': {err['msg']}", param=field) from exc


# -- responses ------------------------------------------------------------------------------------------


def completion_id(prefix: Literal["chatcmpl", "cmpl"]) -> str:
    return f"{prefix}-{random.randrange(999)}"


def finish_reason(done_reason: str | None, tool_calls: bool = False) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if done_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def chat_completion(
    model: str, text: str, done_reason: str | None, prompt_tokens: int, completion_tokens: int,
    *, created: int | None = None, ident: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None, logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:  # the model's thinking, where Ollama's OpenAI layer puts it
        message["reasoning"] = reasoning
    if tool_calls:
        message["tool_calls"] = openai_tool_calls(tool_calls)
    return {
        "id": ident or completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done_reason, bool(tool_calls)),
                     **_choice_logprobs(logprobs)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def _choice_logprobs(logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A choice's ``logprobs`` as Ollama's OpenAI layer writes it (``{"content": [...]}``), when there are some."""
    return {"logprobs": {"content": logprobs}} if logprobs else {}


def completion_logprobs(logprobs: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any]:
    """A legacy completion choice's ``logprobs``: OpenAI's own fields (``tokens``, ``token_logprobs``,
    ``top_logprobs`` as token -> logprob maps, ``text_offset``), which the official client's ``Logprobs`` model
    reads, beside the chat-style ``content`` that Ollama's OpenAI layer writes (clients written against Ollama
    read that one).

    A token's ``text_offset`` is where it starts in the choice's ``text`` (``offset`` is the length of the
    tokens of earlier stream chunks), not in the prompt as well: corral has no ``echo``, and an OpenAI batch line
    is answered without its prompt.  A map holds the alternatives asked for plus the chosen token when it is not
    among them (up to n + 1 entries, as OpenAI's); two alternatives that read the same keep the likelier value.
    """
    if not logprobs:
        return {}
    tokens, values, tops, offsets = [], [], [], []
    for entry in logprobs:
        token = str(entry.get("token", ""))
        top: dict[str, float] = {}
        for alternative in entry.get("top_logprobs") or []:
            top.setdefault(str(alternative.get("token", "")), float(alternative["logprob"]))
        top.setdefault(token, float(entry["logprob"]))
        tokens.append(token)
        values.append(float(entry["logprob"]))
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return {"logprobs": {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets,
                         "content": logprobs}}


def text_completion(
    model: str, text: str, done_reason: str | None, prompt_tokens: int, completion_tokens: int,
    *, created: int | None = None, ident: str | None = None, logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "id": ident or completion_id("cmpl"),
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"text": text, "index": 0, "finish_reason": finish_reason(done_reason),
                     **completion_logprobs(logprobs)}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def embedding_list(
    model: str, vectors: list[list[float]] | np.ndarray, encoding: str, prompt_tokens: int
) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors):
        if encoding == "base64":
            value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        else:
            value = [float(f"{x:.9g}") for x in (vector.tolist() if isinstance(vector, np.ndarray) else vector)]
        data.append({"object": "embedding", "embedding": value, "index": index})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_object(ident: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": created, "owned_by": owned_by}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_native_final(kind: str, model: str, final: dict[str, Any], created: int) -> dict[str, Any]:
    """A stored native result (the non-stream /api/chat or /api/generate body) as OpenAI's response body."""
    prompt, completion = int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    reason = final.get("done_reason")
    if kind == "chat":
        message = final.get("message") or {}
        return chat_completion(
            model, message.get("content", ""), reason, prompt, completion, created=created,
            tool_calls=message.get("tool_calls"), reasoning=message.get("thinking"), logprobs=final.get("logprobs"),
        )
    return text_completion(model, final.get("response", ""), reason, prompt, completion, created=created,
                           logprobs=final.get("logprobs"))


def stream_chunks(
    shape: Literal["chat", "generate"], model: str, include_usage: bool, chunks: Iterator[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Native stream chunks -> OpenAI chunks: deltas, a finish chunk, the usage chunk when asked for."""
    ident = completion_id("chatcmpl" if shape == "chat" else "cmpl")
    created = int(time.time())
    head = {
        "id": ident,
        "object": "chat.completion.chunk" if shape == "chat" else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }
    zero = {"usage": usage(0, 0)} if include_usage and shape == "generate" else {}
    offset = 0  # characters of the tokens streamed so far: a legacy chunk's text_offset continues from them

    def choice(text: str | None, reason: str | None, first: bool, logprobs: Any = None) -> dict[str, Any]:
        nonlocal offset
        if shape == "generate":
            legacy = completion_logprobs(logprobs, offset)
            offset += sum(len(token) for token in legacy["logprobs"]["tokens"]) if legacy else 0
            return {"text": text or "", "index": 0, "finish_reason": reason, **legacy}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", "content": text or ""}
        return {"index": 0, "delta": delta, "finish_reason": reason, **_choice_logprobs(logprobs)}

    first = True
    called = False
    try:
        for chunk in chunks:
            calls = chunk["message"].get("tool_calls") if shape == "chat" else None
            if calls:
                if first:
                    yield {**head, "choices": [choice("", None, True)]}
                    first = False
                called = True
                delta = {"tool_calls": openai_tool_calls(calls)}
                yield {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                continue
            if not chunk["done"]:
                text = chunk["message"]["content"] if shape == "chat" else chunk["response"]
                thinking = chunk["message"].get("thinking") if shape == "chat" else None
                if thinking:  # a reasoning-only delta, with "content": "" as Ollama sends it
                    reasoning: dict[str, Any] = {**({"role": "assistant"} if first else {}), "content": "", "reasoning": thinking}
                    yield {**head, "choices": [{"index": 0, "delta": reasoning, "finish_reason": None}]}
                    first = False
                    if not text:
                        continue
                yield {**head, "choices": [choice(text, None, first, chunk.get("logprobs"))], **zero}
                first = False
                continue
            reason = finish_reason(chunk.get("done_reason"), called)
            if shape == "chat" and first:
                yield {**head, "choices": [choice("", None, True)]}
            yield {**head, "choices": [choice(None, reason, False)], **zero}
            if include_usage:
                counts = usage(int(chunk.get("prompt_eval_count", 0)), int(chunk.get("eval_count", 0)))
                yield {**head, "choices": [], "usage": counts}
            return
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
