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
- ``stop_sequences`` are matched by the API, not by the worker (corral/wire/anthropic_reply.py), as the reply
  must say which one ended it (``stop_reason: "stop_sequence"``); a hit stops the worker as a disconnect does.
  A batch request's are the worker's ``stop`` (its result says ``end_turn``).
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

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.errors import BadRequest
from corral.images import decode
from corral.modelstore.layers import params_of
from corral.modelstore.store import ModelRecord
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
        stop sequences are checked with Ollama's bounds but matched by the API (corral/wire/anthropic_reply.py)."""
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


def parse(model: type[BaseModel], data: Any) -> Any:
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


def context_cap(record: ModelRecord, default_ctx: int) -> int:
    """The model's context as a worker loads it (workers/execution.py ``load_spec``): its PARAMETER ``num_ctx``
    or the server's default, at most what it was trained on."""
    n_ctx = LoadOptions.of(params_of(record)).num_ctx or default_ctx
    trained = int(record.config.get("context_length") or 0)
    return min(n_ctx, trained) if trained else n_ctx


# -- Message Batches ---------------------------------------------------------------------------------------------

MAX_BATCH_REQUESTS = 100_000


class BatchRequest(_Loose):
    custom_id: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    params: dict[str, Any]


class BatchCreate(_Loose):
    """POST /v1/messages/batches: each ``params`` is a whole non-streamed Messages request, validated one by one
    (an invalid one becomes that request's ``errored`` result, as Anthropic's)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"requests": [{"custom_id": "q-1", "params": {
            "model": "smollm2", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}}]}]},
    )

    requests: list[BatchRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)

    def model_post_init(self, _: Any) -> None:
        seen: set[str] = set()
        for n, item in enumerate(self.requests):
            if item.custom_id in seen:
                raise BadRequest(f"requests.{n}.custom_id: '{item.custom_id}' is used by an earlier request; "
                                 "custom_id must be unique within a batch")
            seen.add(item.custom_id)
