"""OpenAI's Responses API (``POST /v1/responses``): the request, its input items, and their translation into the
native chat request every route builds through corral/requests.py.

What arrives is bounded here, before anything runs: the number of input items and tools, metadata's 16 pairs of
64/512 characters, each item's shape (an unknown type is a 400 naming it, as Ollama's ``unknown input item
type``).  :func:`normalize_items` turns the input into items as OpenAI lists them (each with an ``id``, messages
with typed parts): the form a stored response keeps and ``GET /v1/responses/{id}/input_items`` pages through.
:func:`conversation` turns items (a chain's, oldest first) into native messages:

- ``instructions`` become the first system message (per request: never inherited along a chain);
- a ``developer`` message is a ``system`` one (chat templates know no developer role);
- a ``function_call`` joins the assistant message before it (``tool_calls``), as Ollama merges it;
- a ``function_call_output`` is a ``tool`` message carrying its call's name, and must answer a call made earlier
  in the conversation (OpenAI's 400 otherwise);
- a ``reasoning`` item's text is the next assistant message's ``thinking``.

A batch line and a background response run as job items: :func:`item_body` is the native chat they hold, with
the settings their Response echoes.  The reply side (output items, usage, the stream's events) is
:mod:`corral.wire.openai_responses_output`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from corral.errors import BadRequest, NotFound
from corral.options import parse_options
from corral.thinking import think_from_effort
from corral.toolchoice import Constrained, ToolChoice
from corral.wire.ollama import check_schema_budget
from corral.wire.openai import _OpenAIRequest, image_data, parse_request

MAX_INPUT_ITEMS = 10_000
MAX_TOOLS = 512
MAX_METADATA = 16
ROLES = ("user", "assistant", "system", "developer")
SKIPPED_ITEMS = ("web_search_call",)  # accepted and left out of the prompt, as Ollama does


class PreviousResponseNotFound(BadRequest):
    """``previous_response_id`` names no stored response this key may read (OpenAI's 400 and code)."""

    code = "previous_response_not_found"

    def __init__(self, ident: str) -> None:
        super().__init__(f"Previous response with id '{ident}' not found.", param="previous_response_id")


class ResponseNotFound(NotFound):
    """A response id that is unknown, expired, deleted, or another key's."""

    def __init__(self, ident: str) -> None:
        super().__init__(f"Response with id '{ident}' not found.", param="response_id")


def new_id(prefix: str) -> str:
    """``resp_``, ``msg_``, ``fc_``, ``rs_`` and 24 random hex characters (jobs/ids.py's OpenAI look)."""
    return f"{prefix}_{os.urandom(12).hex()}"


class ResponsesRequest(_OpenAIRequest):
    """POST /v1/responses.  Fields OpenAI has and corral does not use (``user``, ``prompt_cache_key``,
    ``service_tier``, ``safety_identifier``, ``max_tool_calls``, ...) are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"model": "smollm2", "input": "Say hello."}]},
    )

    input: str | list[Any] = Field("", description="A user message, or a list of input items.")
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = Field(None, max_length=100)
    conversation: Any = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and len(value) > MAX_INPUT_ITEMS:
            raise BadRequest(f"input may hold at most {MAX_INPUT_ITEMS} items", param="input")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and len(value) > MAX_TOOLS:
            raise BadRequest(f"tools may hold at most {MAX_TOOLS} tools", param="tools")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise BadRequest("metadata takes at most 16 pairs, keys of at most 64 characters and values of at most "
                             "512", param="metadata")
        return value

    def check(self) -> None:
        """What the fields cannot say alone: a model, no ``conversation``, ``background`` only when stored."""
        if not self.model:
            raise BadRequest("model is required", param="model")
        if self.conversation is not None:
            raise BadRequest("conversation is not supported here: chain with previous_response_id",
                             param="conversation")
        if self.background and not self.store:
            raise BadRequest("background responses must be stored (store: true)", param="background")

    def native_options(self) -> dict[str, Any]:
        """Ollama options: ``temperature`` 1.0 when absent (Ollama's Responses layer), then the body's
        ``options``, then the explicit fields."""
        opts: dict[str, Any] = {"temperature": 1.0, **self.options}
        explicit = {"temperature": self.temperature, "top_p": self.top_p, "num_predict": self.max_output_tokens}
        opts.update({k: v for k, v in explicit.items() if v is not None})
        return parse_options(opts)

    def native_format(self) -> str | dict[str, Any] | None:
        """``text.format``: ``json_object`` is Ollama's ``"json"``, a ``json_schema``'s schema is the grammar."""
        fmt = (self.text or {}).get("format")
        if not fmt:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return "json"
        if kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, dict) or not isinstance(fmt.get("name"), str):
                raise BadRequest("text.format of type json_schema needs a 'name' and a 'schema' object",
                                 param="text.format")
            try:
                check_schema_budget(schema)
            except BadRequest as exc:
                raise BadRequest(exc.message, param="text.format") from exc
            return schema
        raise BadRequest(f"invalid text.format type: {kind}", param="text.format")

    def think(self) -> bool | str | None:
        return think_from_effort((self.reasoning or {}).get("effort"))

    def truncate(self) -> bool:
        """``truncation: auto`` fits a long conversation into the context; ``disabled`` (OpenAI's default) is
        a 400 ``context_length_exceeded`` instead."""
        return self.truncation == "auto"

    def native_logprobs(self) -> dict[str, Any]:
        wanted = "message.output_text.logprobs" in (self.include or []) or bool(self.top_logprobs)
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0} if wanted else {}

    def native_tools(self) -> list[dict[str, Any]]:
        """The function tools, in Ollama's (Chat's nested) shape; hosted tools (web search, file search, MCP,
        shell, ...) have nothing to run them here and are left out."""
        out = []
        for index, tool in enumerate(self.tools or []):
            if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
                raise BadRequest(f"tools[{index}] must be an object with a 'type'", param="tools")
            if tool["type"] != "function":
                continue
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest(f"tools[{index}] is a function without a 'name'", param="tools")
            parameters = tool.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise BadRequest(f"tools[{index}].parameters must be a JSON Schema object", param="tools")
            function: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
            if isinstance(tool.get("description"), str):
                function["description"] = tool["description"]
            out.append({"type": "function", "function": function})
        return out


# -- input items --------------------------------------------------------------------------------------------


def normalize_items(value: str | list[Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as items with ids, in OpenAI's listed shapes; a 400 naming the first bad one."""
    if isinstance(value, str):
        return [_message({"role": "user", "content": value}, 0)]
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{index}] must be an object", param="input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            items.append(_message(item, index))
        elif kind == "function_call":
            items.append(_function_call(item, index))
        elif kind == "function_call_output":
            items.append(_function_call_output(item, index))
        elif kind == "reasoning":
            items.append(_reasoning(item, index))
        elif kind in SKIPPED_ITEMS:
            items.append({**item, "id": _given_id(item) or new_id("ws")})
        elif kind == "item_reference":
            raise BadRequest(f"input[{index}]: item_reference is not supported: send the item itself, or chain with "
                             "previous_response_id", param="input")
        else:
            raise BadRequest(f"input[{index}]: unknown input item type: {kind}", param="input")
    return items


def _given_id(item: dict[str, Any]) -> str | None:
    ident = item.get("id")
    return ident[:100] if isinstance(ident, str) and ident else None


def _message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ROLES:
        raise BadRequest(f"input[{index}].role must be one of {list(ROLES)}", param="input")
    content = item.get("content")
    text_part = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts: list[dict[str, Any]] = [{"type": text_part, "text": content}]
    elif isinstance(content, list):
        parts = [_part(part, index, role) for part in content]
    else:
        raise BadRequest(f"input[{index}].content must be a string or a list of parts", param="input")
    if role == "assistant":
        parts = [{**p, "annotations": p.get("annotations") or []} if p["type"] == "output_text" else p for p in parts]
    return {"id": _given_id(item) or new_id("msg"), "type": "message", "role": role,
            "status": item.get("status") or "completed", "content": parts}


def _part(part: Any, index: int, role: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"input[{index}]: an {kind} part needs a string 'text'", param="input")
        return dict(part)
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return dict(part)
    if kind == "input_image" and role != "assistant":
        if not isinstance(part.get("image_url"), str):
            raise BadRequest(f"input[{index}]: an input_image needs an image_url (a data URL); file_id images are "
                             "not supported", param="input")
        image_data(part["image_url"])  # a 400 now for a remote URL or bad data, not when the chain is replayed
        return {"type": "input_image", "image_url": part["image_url"], "detail": part.get("detail") or "auto"}
    if kind == "input_file":
        raise BadRequest(f"input[{index}]: input_file is not supported", param="input")
    raise BadRequest(f"input[{index}]: invalid content part type: {kind}", param="input")


def _function_call(item: dict[str, Any], index: int) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise BadRequest(f"input[{index}]: a function_call needs a 'call_id' and a 'name'", param="input")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments)
    if not isinstance(arguments, str) or not isinstance(_arguments(arguments, index), dict):
        raise BadRequest(f"input[{index}].arguments must be a JSON object as a string", param="input")
    return {"id": _given_id(item) or new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": item.get("status") or "completed"}


def _arguments(text: str, index: int) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise BadRequest(f"input[{index}].arguments is not valid JSON", param="input") from exc


def _function_call_output(item: dict[str, Any], index: int) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or not call_id:
        raise BadRequest(f"input[{index}]: a function_call_output needs a 'call_id'", param="input")
    if isinstance(output, list):
        output = [_part(part, index, "tool") for part in output]
    elif not isinstance(output, str):
        raise BadRequest(f"input[{index}].output must be a string or a list of parts", param="input")
    return {"id": _given_id(item) or new_id("fco"), "type": "function_call_output", "call_id": call_id,
            "output": output, "status": item.get("status") or "completed"}


def _reasoning(item: dict[str, Any], index: int) -> dict[str, Any]:
    summary, content = item.get("summary") or [], item.get("content") or []
    if not isinstance(summary, list) or not isinstance(content, list):
        raise BadRequest(f"input[{index}]: a reasoning item's summary and content are lists", param="input")
    out = {"id": _given_id(item) or new_id("rs"), "type": "reasoning",
           "summary": [{"type": "summary_text", "text": str(s.get("text", ""))} for s in summary if isinstance(s, dict)]}
    if content:
        out["content"] = [{"type": "reasoning_text", "text": str(c.get("text", ""))} for c in content
                          if isinstance(c, dict)]
    if isinstance(item.get("encrypted_content"), str):
        out["encrypted_content"] = item["encrypted_content"]
    return out


def reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item's thinking: corral's ``encrypted_content`` is the plain text (as Ollama's), else its
    raw ``content``, else its summary."""
    if item.get("encrypted_content"):
        return str(item["encrypted_content"])
    for key in ("content", "summary"):
        text = "".join(str(p.get("text", "")) for p in item.get(key) or [])
        if text:
            return text
    return ""


def conversation(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Normalized items (a whole chain, oldest first) as native chat messages."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name, for the tool message that answers it
    thinking = ""
    for index, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":
            thinking += reasoning_text(item)
        elif kind == "message":
            text, images = _text_and_images(item["content"])
            message: dict[str, Any] = {"role": "system" if item["role"] == "developer" else item["role"],
                                       "content": text}
            if images:
                message["images"] = images
            if item["role"] == "assistant" and thinking:
                message["thinking"], thinking = thinking, ""
            out.append(message)
        elif kind == "function_call":
            names[item["call_id"]] = item["name"]
            call = {"id": item["call_id"], "function": {"name": item["name"], "arguments": _arguments(item["arguments"], index)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and not thinking:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if thinking:
                    out[-1]["thinking"], thinking = thinking, ""
        elif kind == "function_call_output":
            name = names.get(item["call_id"])
            if name is None:
                raise BadRequest(f"No tool call found for function call output with call_id {item['call_id']}.",
                                 param="input")
            output = item["output"]
            text, images = (output, []) if isinstance(output, str) else _text_and_images(output)
            tool: dict[str, Any] = {"role": "tool", "content": text, "tool_call_id": item["call_id"], "name": name,
                                    "tool_name": name}
            if images:
                tool["images"] = images
            out.append(tool)
    return out


def _text_and_images(parts: list[dict[str, Any]]) -> tuple[str, list[str]]:
    texts, images = [], []
    for part in parts:
        if part["type"] == "input_image":
            images.append(image_data(part["image_url"]))
        else:
            texts.append(str(part.get("text", part.get("refusal", ""))))
    return "".join(texts), images


# -- batch lines and background responses: the native body of a job item ---------------------------------

ECHOED = ("model", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "reasoning",
          "max_output_tokens", "temperature", "top_p", "top_logprobs", "metadata", "truncation", "include",
          "previous_response_id", "background", "store")


def item_body(req: ResponsesRequest, messages: list[dict[str, Any]], plan: Constrained) -> dict[str, Any]:
    """The native chat a job item runs for a Responses request; ``responses`` keeps the settings its Response
    echoes (the result is rendered from them: corral/wire/openai_responses_output.py :func:`job_response`)."""
    native: dict[str, Any] = {"messages": messages, "options": req.native_options(), **req.native_logprobs(),
                              "responses": req.model_dump(include=set(ECHOED), exclude_none=True)}
    for key, value in (("think", req.think()), ("tools", plan.tools), ("format", plan.format)):
        if value is not None:
            native[key] = value
    return native


def batch_body(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``/v1/responses`` line of an OpenAI batch -> (model, the native chat item body), as the sync route
    builds it.  A batch line cannot chain (its key's stored responses are not read) or stream."""
    req: ResponsesRequest = parse_request(ResponsesRequest, body)
    req.check()
    if req.previous_response_id:
        raise BadRequest("previous_response_id is not supported in a batch: send the whole input",
                         param="previous_response_id")
    req.store = req.background = False
    plan = ToolChoice.from_openai(req.tool_choice).constrain(req.native_tools(), req.native_format())
    return req.model, item_body(req, conversation(normalize_items(req.input), req.instructions), plan)
