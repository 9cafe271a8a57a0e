"""Anthropic's Messages API: its request shapes, their translation to corral's native chat, and its replies.

Shared by ``POST /v1/messages`` (api/anthropic.py) and Message Batches (jobs/message_batches.py), so a batch
request runs the same native chat as the same body sent to the sync route, and its stored result becomes the
same ``Message``.  The request models are pydantic and bounded at the door (100,000 messages, as Anthropic;
the body itself is bounded by ``CORRAL_MAX_BODY``), and their complaints read as Anthropic's do
(``messages.0.content.1.type: ...``).

What a Messages request becomes (as Ollama's Anthropic layer maps it, plus what Ollama ignores):

- ``system`` (a string or text blocks, joined) is the first system message; ``role: "system"`` entries in
  ``messages`` (Claude Code's reminders) and ``mid_conv_system`` blocks stay system messages where they are.
- ``text`` blocks join into the message's content; ``image`` blocks (base64) go to its ``images``;
  ``tool_use`` blocks are the assistant's ``tool_calls``; a ``tool_result`` becomes a ``tool`` message before
  the user's text, ``is_error`` marked in its content (Ollama drops the flag); ``thinking`` is the assistant's
  ``thinking``.  A ``tool_result`` whose ``tool_use_id`` no earlier ``tool_use`` declared is a 400.
- ``max_tokens`` (required) is ``num_predict``, capped at the model's context (Claude Code asks for 32,000 of a
  model that holds 8,192); ``temperature``, ``top_p``, ``top_k`` pass through.
- ``stop_sequences`` are matched here, not by the worker (:class:`StopScanner`), because the reply must say
  which one ended it (``stop_reason: "stop_sequence"``); a hit stops the worker as a disconnect does.
- ``tools`` (``input_schema``) are Ollama function tools; server tools (dated types) are dropped: nothing runs
  them here.  ``tool_choice`` goes through corral/toolchoice.py (``none`` drops the tools, ``any`` and ``tool``
  force a call by grammar).
- ``thinking``: ``enabled`` thinks, ``disabled`` does not, ``adaptive`` (or absent) is the model's default,
  and ``output_config.effort`` picks a level when ``thinking`` is absent.  A model that cannot think answers
  without thinking, never a 400 (Ollama relaxes it the same way).  ``output_config.format`` (a JSON schema) is
  the native ``format``.
- ``cache_control``, ``metadata``, ``context_management``, ``service_tier`` and beta fields are accepted and
  ignored.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.errors import BadRequest, CorralError
from corral.images import decode
from corral.options import LoadOptions, parse_options
from corral.toolchoice import Constrained, ToolChoice
from corral.wire.ollama import check_schema_budget

MAX_MESSAGES = 100_000
MAX_TOOLS = 1_000
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
# Server-side tools and their result blocks: Anthropic runs them, nothing here can, so they are dropped.
SERVER_BLOCKS = ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                 "bash_code_execution_tool_result", "text_editor_code_execution_tool_result",
                 "tool_search_tool_result", "container_upload", "search_result", "tool_reference")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- request blocks ------------------------------------------------------------------------------------------


class TextBlock(_Loose):
    type: Literal["text"]
    text: str


class Base64Source(_Loose):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(_Loose):
    type: Literal["url"]
    url: str


class ImageBlock(_Loose):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]


class DocumentBlock(_Loose):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None


class ToolUseBlock(_Loose):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any] = Field(default_factory=dict)


ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(_Loose):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool = False


class ThinkingBlock(_Loose):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_Loose):
    type: Literal["redacted_thinking"]
    data: str = ""


class MidConversationSystem(_Loose):
    type: Literal["mid_conv_system"]
    content: str | list[TextBlock]


class ServerBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal[SERVER_BLOCKS]  # type: ignore[valid-type]


Block = Annotated[
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
    | MidConversationSystem | ServerBlock,
    Field(discriminator="type"),
]


class MessageParam(_Loose):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class CustomTool(_Loose):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoiceAuto(_Loose):
    type: Literal["auto"]
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(_Loose):
    type: Literal["any"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(_Loose):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(_Loose):
    type: Literal["none"]


class ThinkingEnabled(_Loose):
    type: Literal["enabled"]
    budget_tokens: int = Field(1024, ge=0)


class ThinkingDisabled(_Loose):
    type: Literal["disabled"]


class ThinkingAdaptive(_Loose):
    type: Literal["adaptive"]


class OutputConfig(_Loose):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: dict[str, Any] | None = None


class _Conversation(_Loose):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share."""

    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
                           Field(discriminator="type")] | None = None
    thinking: Annotated[ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive, Field(discriminator="type")] | None = None
    output_config: OutputConfig | None = None

    def native(self, *, thinks: bool) -> Native:
        """The native chat this conversation is: messages, tools under ``tool_choice``, format and think
        (``thinks``: whether the model can, else thinking is off rather than refused)."""
        messages = native_messages(self.system, self.messages)
        tools = native_tools(self.tools)
        fmt: str | dict[str, Any] | None = None
        if self.output_config is not None and self.output_config.format is not None:
            fmt = _output_format(self.output_config.format)
        plan = _tool_choice(self.tool_choice).constrain(tools, fmt)
        return Native(messages, plan, self.think() if thinks else None)

    def think(self) -> bool | str | None:
        if self.thinking is not None:
            return {"enabled": True, "disabled": False}.get(self.thinking.type)
        effort = self.output_config.effort if self.output_config else None
        return {"xhigh": "high"}.get(effort, effort) if effort else None


class MessagesRequest(_Conversation):
    """POST /v1/messages (and each request of a Message Batch)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "smollm2", "max_tokens": 64,
                                         "messages": [{"role": "user", "content": "Hi"}]}]},
    )

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def options(self, num_ctx: int) -> dict[str, Any]:
        """Ollama options: ``max_tokens`` capped at ``num_ctx`` (the model's context), the sampling fields; the
        stop sequences are checked with Ollama's bounds but matched by :class:`StopScanner`."""
        opts: dict[str, Any] = {"num_predict": min(self.max_tokens, num_ctx)}
        for key in ("temperature", "top_p", "top_k"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.stop_sequences:
            parse_options({"stop": self.stop_sequences})  # Ollama's bounds on stop strings
        return parse_options(opts)

    def stops(self) -> list[str]:
        return [s for s in self.stop_sequences or [] if s]


class CountTokensRequest(_Conversation):
    """POST /v1/messages/count_tokens (no ``max_tokens``)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}]},
    )


@dataclass
class Native:
    """A Messages request as a native chat: its messages, the tools and format under ``tool_choice``, think."""

    messages: list[dict[str, Any]]
    plan: Constrained
    think: bool | str | None = None
    images: bool = field(init=False)

    def __post_init__(self) -> None:
        self.images = any(m.get("images") for m in self.messages)


def parse(model: type[_Conversation], data: Any) -> Any:
    """Validate a decoded body; pydantic's first complaint becomes a 400 worded as Anthropic's
    (``messages.0.content.0.type: ...``)."""
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_complaint(exc)) from exc


def _complaint(exc: ValidationError) -> str:
    """The deepest complaint: for a union (a string or blocks) the branch that got furthest says what is wrong."""
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e["loc"]))
    path = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    return f"{path}: {err['msg']}" if path else str(err["msg"])


def _is_union_tag(part: Any) -> bool:
    """pydantic's loc names the union member it tried (``str``, ``list[...]``, a tag): not part of the path."""
    return isinstance(part, str) and (part in ("str", "list") or part.startswith(("list[", "function-")) or "[" in part)


def _output_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise BadRequest("output_config.format: only {type: 'json_schema', schema: {...}} is supported")
    try:
        check_schema_budget(fmt["schema"])
    except BadRequest as exc:
        raise BadRequest(f"output_config.format: {exc.message}") from exc
    schema: dict[str, Any] = fmt["schema"]
    return schema


def _tool_choice(choice: Any) -> ToolChoice:
    if choice is None or choice.type == "auto":
        return ToolChoice()
    if choice.type == "none":
        return ToolChoice("none")
    if choice.type == "any":
        return ToolChoice("required")
    return ToolChoice("required", name=choice.name)


def native_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic tools -> Ollama function tools; server tools (a dated ``type``, no ``input_schema``) dropped."""
    out = []
    for n, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools.{n}: Input should be an object")
        if "input_schema" not in tool and tool.get("type") not in (None, "custom"):
            continue  # web_search_20250305, bash_20250124, ...: run by Anthropic's servers, not here
        try:
            custom = CustomTool.model_validate(tool)
        except ValidationError as exc:
            raise BadRequest(f"tools.{n}.{_complaint(exc)}") from exc
        function: dict[str, Any] = {"name": custom.name, "parameters": custom.input_schema}
        if custom.description:
            function["description"] = custom.description
        out.append({"type": "function", "function": function})
    return out or None


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else "".join(b.text for b in content)


def _image(block: ImageBlock, where: str) -> str:
    source = block.source
    if isinstance(source, URLSource):
        raise BadRequest(f"{where}: invalid image source type: url. Only base64 images are supported.")
    if source.media_type not in IMAGE_TYPES:
        raise BadRequest(f"{where}.source.media_type: must be one of {', '.join(IMAGE_TYPES)}")
    decode(source.data)  # a 400 for text that is not base64
    return source.data


def _document(block: DocumentBlock, where: str) -> str:
    source = block.source
    data = source.get("data")
    if source.get("type") == "text" and isinstance(data, str):
        return (f"{block.title}\n\n" if block.title else "") + data
    raise BadRequest(f"{where}: only documents with a text source are supported (no PDFs or URLs)")


def native_messages(system: str | list[TextBlock] | None, messages: list[MessageParam]) -> list[dict[str, Any]]:
    """The conversation as Ollama chat messages (see the module docstring)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text(system)})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        images: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ImageBlock):
                images.append(_image(block, where))
            elif isinstance(block, DocumentBlock):
                texts.append(_document(block, where))
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise BadRequest(f"{where}: tool_use blocks belong in assistant messages")
                names[block.id] = block.name
                calls.append({"id": block.id, "function": {"index": len(calls), "name": block.name,
                                                           "arguments": block.input}})
            elif isinstance(block, ToolResultBlock):
                if block.tool_use_id not in names:
                    raise BadRequest(
                        f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: {block.tool_use_id}. "
                        "Each `tool_result` block must have a corresponding `tool_use` block in a previous message.")
                out.append(_tool_message(block, names[block.tool_use_id], where))
            elif isinstance(block, ThinkingBlock):
                thinking.append(block.thinking)
            elif isinstance(block, MidConversationSystem):
                out.append({"role": "system", "content": _text(block.content)})
            # redacted thinking and server-tool blocks carry nothing a local model can read
        if not (texts or images or thinking or calls):
            continue
        native: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
        if images:
            native["images"] = images
        if thinking and message.role == "assistant":
            native["thinking"] = "".join(thinking)
        if calls:
            native["tool_calls"] = calls
        out.append(native)
    if not any(m["role"] != "system" for m in out):
        raise BadRequest("messages: at least one message is required")
    return out


def _tool_message(block: ToolResultBlock, name: str, where: str) -> dict[str, Any]:
    texts: list[str] = []
    images: list[str] = []
    if isinstance(block.content, str):
        texts.append(block.content)
    for k, part in enumerate(block.content if isinstance(block.content, list) else []):
        if isinstance(part, TextBlock):
            texts.append(part.text)
        elif isinstance(part, ImageBlock):
            images.append(_image(part, f"{where}.content.{k}"))
        else:
            texts.append(_document(part, f"{where}.content.{k}"))
    text = "\n".join(texts)
    if block.is_error:
        text = f"Error: {text}" if text else "Error"
    message: dict[str, Any] = {"role": "tool", "content": text, "tool_name": name, "name": name,
                               "tool_call_id": block.tool_use_id}
    if images:
        message["images"] = images
    return message


def context_cap(options: dict[str, Any], params: dict[str, Any], default_ctx: int) -> int:
    """The model's context as this request loads it (the request's ``num_ctx``, its PARAMETER, the server's)."""
    return LoadOptions.of({**params, **options}).num_ctx or default_ctx


# -- replies ---------------------------------------------------------------------------------------------------


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def stop_reason(done_reason: str | None, calls: bool, stop_sequence: str | None) -> str:
    if calls:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if done_reason == "length" else "end_turn"


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    """An Ollama tool call as a ``tool_use`` block (ids made Anthropic-looking)."""
    function = call["function"]
    return {"type": "tool_use", "id": tool_use_id(), "name": function["name"], "input": function.get("arguments") or {}}


def message_object(
    model: str, text: str, thinking: str, calls: list[dict[str, Any]], done_reason: str | None,
    stop_sequence: str | None, input_tokens: int, output_tokens: int, *, ident: str | None = None,
) -> dict[str, Any]:
    """The non-streamed ``Message``: blocks in Ollama's order (thinking, text, tool_use), ``text`` and
    ``signature`` always present."""
    content: list[dict[str, Any]] = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text or not calls:
        content.append({"type": "text", "text": text})
    content.extend(tool_use_block(c) for c in calls)
    return {
        "id": ident or message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(done_reason, bool(calls), stop_sequence), "stop_sequence": stop_sequence,
        "usage": usage(input_tokens, output_tokens),
    }


def from_native_final(model: str, final: dict[str, Any], forced: list[str] | None = None,
                      ident: str | None = None) -> dict[str, Any]:
    """A stored native chat result (a batch item's output) as a ``Message``; ``forced``: the tools of which
    ``tool_choice`` forced a call (a call left as text becomes the call, corral/toolchoice.py)."""
    message = final.get("message") or {}
    content, calls = message.get("content", ""), list(message.get("tool_calls") or [])
    if forced:
        content, calls = Constrained(None, None, frozenset(forced)).reply(content, calls)
    return message_object(model, content, message.get("thinking") or "", calls, final.get("done_reason"), None,
                          int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)), ident=ident)


class StopScanner:
    """Matches ``stop_sequences`` in the reply's text as it streams: what is safe to pass on, and the sequence
    that ended the reply (a text that may still become one is held back)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if self.hit is not None or not self.stops:
            return "" if self.hit is not None else text
        self.pending += text
        found = [(at, s) for s in self.stops if (at := self.pending.find(s)) >= 0]
        if found:
            at, self.hit = min(found)
            out, self.pending = self.pending[:at], ""
            return out
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# -- errors ----------------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for a status (its table; other 4xx are ``invalid_request_error``)."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(message: str, status: int) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message},
            "request_id": f"req_{secrets.token_hex(12)}"}


def error_of(exc: BaseException) -> dict[str, Any]:
    """A mid-stream error event's data (or a batch request's ``errored`` error)."""
    if isinstance(exc, CorralError):
        return error_body(exc.message, exc.status_code)
    return error_body(f"internal error: {type(exc).__name__}", 500)


def sse_event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event: the Anthropic SDK dispatches on the ``event:`` line, so it is always written."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"



# -- one reply, streamed or whole --------------------------------------------------------------------------------

Event = tuple[str, dict[str, Any]]


class Reply:
    """Native chat chunks -> one ``Message``: as the stream's events (:meth:`feed`, dense block indices, each
    block closed before the next opens, as the SDK's accumulator needs) and as the whole object
    (:meth:`message`).  Text goes through the :class:`StopScanner` (``on_stop`` stops the worker; what it
    still sends is dropped); under a forced ``tool_choice`` it is held to the end, where a call left as text
    becomes the call."""

    def __init__(self, model: str, stops: list[str], plan: Constrained, input_estimate: int = 0,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.model, self.plan, self.input_estimate = model, plan, input_estimate
        self.ident = message_id()
        self.scanner = StopScanner(stops)
        self.on_stop = on_stop
        self.open: str | None = None
        self.index = -1
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.held: list[str] = []
        self.final: dict[str, Any] = {}

    def start(self) -> Event:
        head: dict[str, Any] = {"id": self.ident, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage(self.input_estimate, 0)}
        return "message_start", {"type": "message_start", "message": head}

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if chunk.get("done"):
            return self._finish(chunk)
        if self.scanner.hit is not None:
            return []
        message = chunk.get("message") or {}
        events: list[Event] = []
        if message.get("thinking"):
            self.thinking.append(message["thinking"])
            events += self._delta("thinking", message["thinking"])
        if message.get("content"):
            if self.plan.forced:
                self.held.append(message["content"])
            else:
                safe = self.scanner.feed(message["content"])
                if self.scanner.hit is not None and self.on_stop is not None:
                    self.on_stop()
                events += self._text(safe)
        for call in message.get("tool_calls") or []:
            events += self._call(call)
        return events

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        self.text.append(text)
        return self._delta("text", text)

    def _delta(self, kind: str, text: str) -> list[Event]:
        events = self._open(kind, {"type": "text", "text": ""} if kind == "text"
                            else {"type": "thinking", "thinking": "", "signature": ""})
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        return [*events, ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})]

    def _call(self, call: dict[str, Any]) -> list[Event]:
        self.calls.append(call)
        block = tool_use_block(call)
        events = self._open("tool_use", {**block, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}))
        return [*events, *self._close()]

    def _open(self, kind: str, block: dict[str, Any]) -> list[Event]:
        if self.open == kind:
            return []
        events = self._close()
        self.index += 1
        self.open = kind
        return [*events, ("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def _close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _finish(self, chunk: dict[str, Any]) -> list[Event]:
        self.final = chunk
        events: list[Event] = []
        if self.plan.forced:
            content, calls = self.plan.reply("".join(self.held), [])
            for call in calls:
                events += self._call(call)
            events += self._text(content)
        elif self.scanner.hit is None:
            events += self._text(self.scanner.flush())
        if self.index < 0:  # an empty reply still has its (empty) text block
            events += self._open("text", {"type": "text", "text": ""})
        events += self._close()
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": self.scanner.hit}
        counts = {"input_tokens": int(chunk.get("prompt_eval_count", 0)),
                  "output_tokens": int(chunk.get("eval_count", 0))}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": counts}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def stop_reason(self) -> str:
        return stop_reason(self.final.get("done_reason"), bool(self.calls), self.scanner.hit)

    def message(self) -> dict[str, Any]:
        """The whole ``Message`` once the last chunk is fed."""
        return message_object(
            self.model, "".join(self.text), "".join(self.thinking), self.calls, self.final.get("done_reason"),
            self.scanner.hit, int(self.final.get("prompt_eval_count", 0)), int(self.final.get("eval_count", 0)),
            ident=self.ident)
