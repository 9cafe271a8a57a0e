"""Ollama's native wire format: request shapes (api/types.go) as pydantic models, and the reply objects
(stream chunks and final replies) built in one place for the API's streams and the batch results alike.

Unknown fields are ignored, as Go's decoder ignores them.  Validation failures are turned into Ollama's own
messages (``json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string``,
``option "top_k" must be of type integer``) by :func:`parse_body`.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.errors import BadRequest
from corral.gbnf import GrammarTooLarge, InvalidSchema, schema_grammar
from corral.options import RuntimeRequest
from corral.thinking import check_think
from corral.timefmt import utc_now


class _Request(RuntimeRequest):
    """Ollama's request fields shared by every model route."""


# A `format` schema's size and nesting are bounded before it is converted (the converter recurses on nesting);
# the grammar's own budget is measured on the converter's output (corral/gbnf/budget.py).
MAX_SCHEMA_BYTES = 64 << 10
MAX_SCHEMA_DEPTH = 32


def check_format(value: Any) -> Any:
    """``format``: absent, ``"json"``, or a JSON Schema within the grammar budget above (400 otherwise)."""
    if value is None or value == "" or value == "json":
        return value or None
    if isinstance(value, dict):
        check_schema_budget(value)
        return value
    raw = json.dumps(value)
    raise BadRequest(f'invalid format: {json.dumps(raw)}; expected "json" or a valid JSON Schema object')


def check_schema_budget(schema: dict[str, Any]) -> None:
    """Refuse a JSON Schema that llama.cpp's converter cannot turn into a grammar, or whose grammar would be too
    large or too deep for llama.cpp to build safely: a 400 here, never a crash in the worker."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"invalid format: the JSON Schema is larger than {MAX_SCHEMA_BYTES} bytes")
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise BadRequest(f"invalid format: the JSON Schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    try:
        schema_grammar(schema)
    except (GrammarTooLarge, InvalidSchema) as exc:
        raise BadRequest(f"invalid format: {str(exc)[:300]}") from exc


class _Generation(_Request):
    stream: bool | None = Field(None, description="Defaults to true when absent or null.")
    format: Any = Field(None, description='"json" or a JSON Schema object constraining the output.')
    think: bool | str | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        return check_format(value)

    @field_validator("think", mode="before")
    @classmethod
    def _think(cls, value: Any) -> Any:
        return check_think(value)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 20:
            raise BadRequest("top_logprobs must be between 0 and 20")
        return value

    @property
    def streaming(self) -> bool:
        return self.stream is not False


class GenerateRequest(_Generation):
    """POST /api/generate."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"model": "smollm2", "prompt": "Why is the sky blue?"}]}
    )

    prompt: str = ""
    suffix: str = ""
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class Message(BaseModel):
    """One chat message; ``role`` is lower-cased on decode, as Ollama does."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        return value.lower()

    def for_template(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            data["thinking"] = self.thinking  # a Go template's .Thinking; Jinja templates' reasoning_content
            data["reasoning_content"] = self.thinking
        if self.tool_calls:
            data["tool_calls"] = self.tool_calls
        if self.tool_name:
            data["name"] = self.tool_name  # Jinja templates' message.name
            data["tool_name"] = self.tool_name  # a Go template's .ToolName
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        if self.images:
            data["images"] = self.images  # tagged into the text before the template renders (corral/images.py)
        return data


class ChatRequest(_Generation):
    """POST /api/chat."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "smollm2", "messages": [{"role": "user", "content": "Hello!"}]}]},
    )

    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class EmbedRequest(_Request):
    """POST /api/embed."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"model": "smollm2", "input": ["a", "b"]}]})

    input: Any = ""
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _input(self) -> EmbedRequest:
        value = self.input
        if value is None:
            self.input = ""
        elif not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value))):
            raise BadRequest("invalid input type")
        check_embed_count(value)
        return self

    @property
    def inputs(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return list(self.input)


class EmbeddingsRequest(_Request):
    """POST /api/embeddings (legacy: one prompt, vector not normalized)."""

    prompt: str = ""


class ShowRequest(BaseModel):
    """POST /api/show (``model``, or the older ``name``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = ""
    verbose: bool = False

    @property
    def target(self) -> str:
        return self.model or self.name


class DeleteRequest(ShowRequest):
    """DELETE /api/delete."""


class PullRequest(ShowRequest):
    """POST /api/pull (``insecure``: plain http to the registry, as in Ollama)."""

    stream: bool | None = None
    insecure: bool = False


class CreateRequest(ShowRequest):
    """POST /api/create: a new model from a GGUF blob (``files``) or an existing model (``from``), with the
    layers that change its behaviour."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "house", "from": "smollm2", "system": "Answer in French.",
                                         "parameters": {"temperature": 0.2}}]},
    )

    from_: str = Field("", alias="from")
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    template: str | None = None
    license: str | list[str] | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    quantize: str | None = None
    stream: bool | None = None


class CopyRequest(BaseModel):
    """POST /api/copy."""

    model_config = ConfigDict(extra="ignore")

    source: str = ""
    destination: str = ""


_GO_TYPES = {"string": "string", "int": "int", "bool": "bool", "float": "float64", "list": "[]", "dict": "map"}
_JSON_KINDS = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}
M = TypeVar("M", bound=BaseModel)


MAX_JSON_DEPTH = 64


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def parse_json(raw: bytes | str) -> Any:
    """``json.loads`` as Go's decoder sees JSON: no NaN or Infinity, text that is valid UTF-8 (a lone surrogate
    such as ``"\\ud800"`` is refused, so no stored value can break a later reply), and at most
    :data:`MAX_JSON_DEPTH` levels of nesting.  Raises :class:`json.JSONDecodeError`, :class:`UnicodeError` or
    :class:`~corral.errors.BadRequest`."""
    try:
        if isinstance(raw, bytes) and raw.isascii():  # json.loads would build a decoder and sniff the encoding
            value = _DECODER.decode(raw.decode("ascii"))
        else:
            value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:
        if isinstance(exc, (json.JSONDecodeError, UnicodeError)):
            raise
        raise BadRequest(str(exc)) from exc
    if _may_need_checking(raw):
        _check_value(value)
    return value


def _may_need_checking(raw: bytes | str) -> bool:
    """Whether a decoded document can hold a lone surrogate or nest too deep at all.  ASCII text without a
    ``\\u`` escape decodes to no surrogate, and nesting needs as many brackets: most JSONL lines have neither,
    and skip the walk (a third of a million-line upload's parse time)."""
    if isinstance(raw, bytes):
        return not raw.isascii() or b"\\u" in raw or raw.count(b"{") + raw.count(b"[") >= MAX_JSON_DEPTH
    return not raw.isascii() or "\\u" in raw or raw.count("{") + raw.count("[") >= MAX_JSON_DEPTH


def _check_value(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest("invalid string in JSON: a lone surrogate (\\ud800-\\udfff) is not valid UTF-8") from exc
        elif isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise BadRequest(f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def decode_json(raw: bytes) -> Any:
    """Decode a request body with Ollama's errors: empty -> "missing request body", bad JSON -> Go's words."""
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        return parse_json(raw)
    except UnicodeDecodeError as exc:
        raise BadRequest("invalid character in request body") from exc
    except json.JSONDecodeError as exc:
        if exc.pos >= len(exc.doc.rstrip()):
            raise BadRequest("unexpected EOF") from exc
        char = exc.doc[exc.pos]
        if exc.msg.startswith("Expecting value"):
            raise BadRequest(f"invalid character '{char}' looking for beginning of value") from exc
        if exc.msg.startswith("Expecting property name"):
            raise BadRequest(f"invalid character '{char}' looking for beginning of object key string") from exc
        raise BadRequest(f"invalid character '{char}' {exc.msg[0].lower()}{exc.msg[1:]}") from exc


def parse_body(model: type[M], raw: bytes) -> M:
    """Decode and validate a JSON body into ``model``; a JSON ``null`` body is an empty request."""
    data = decode_json(raw)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "value")
        raise BadRequest(f"json: cannot unmarshal {kind} into Go value of type api.{model.__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_go_message(exc, model.__name__, data)) from exc


def _go_message(exc: ValidationError, struct: str, data: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    value: Any = data
    for part in err["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    kind = _JSON_KINDS.get(type(value), "value")
    want = err["type"].split("_")[0]
    go_type = _GO_TYPES.get(want, want)
    if err["type"] in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return f"invalid value for {loc}: {err['msg']}"
    return f"json: cannot unmarshal {kind} into Go struct field {struct}.{loc} of type {go_type}"


MAX_EMBED_INPUTS = 2048  # inputs per embedding request or job line (OpenAI's limit too); the worker packs them


def check_embed_count(value: Any) -> None:
    if isinstance(value, list) and len(value) > MAX_EMBED_INPUTS:
        raise BadRequest(f"too many inputs: {len(value)}; at most {MAX_EMBED_INPUTS} per request (use a job for more)")


def check_context(context: list[int] | None, vocab_size: int) -> None:
    """``context`` token ids must be inside the model's vocabulary (0 when unknown: the worker checks then)."""
    if context and vocab_size:
        bad = next((t for t in context if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequest(f"invalid context: token id {bad} is outside the model's vocabulary (0 to {vocab_size - 1})")


def is_zero_keep_alive(value: float | None) -> bool:
    return value is not None and not math.isinf(value) and value == 0


# -- replies -------------------------------------------------------------------------------------------------

METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


def ollama_chunk(
    model: str, shape: str, text: str, *, done: bool, thinking: str = "", logprobs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An intermediate chunk of /api/generate (``response``) or /api/chat (``message``), with the model's
    ``thinking`` and the tokens' ``logprobs`` when there are some (Ollama's omitempty)."""
    chunk: dict[str, Any] = {"model": model, "created_at": utc_now()}
    if shape == "chat":
        chunk["message"] = {"role": "assistant", "content": text}
        if thinking:
            chunk["message"]["thinking"] = thinking
    else:
        chunk["response"] = text
        if thinking:
            chunk["thinking"] = thinking
    chunk["done"] = done
    if logprobs:
        chunk["logprobs"] = logprobs
    return chunk


def ollama_final(
    model: str, shape: str, stats: dict[str, Any], text: str = "", *, thinking: str = "",
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The final chunk (``text`` empty) or the whole non-stream reply (``text`` = everything generated)."""
    chunk = ollama_chunk(model, shape, text, done=True, thinking=thinking, logprobs=logprobs)
    reason = stats.get("done_reason")
    if reason and reason != "cancelled":
        chunk["done_reason"] = reason
    if shape == "generate" and stats.get("context"):
        chunk["context"] = stats["context"]
    for key in METRICS:
        if stats.get(key):  # Go's omitempty: zero metrics are left out
            chunk[key] = int(stats[key])
    return chunk
