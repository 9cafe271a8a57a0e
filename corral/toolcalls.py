"""Tool calls in model output: when to hold text back, and how to read calls out of it.

Ollama renders ``tools`` into the prompt with the model's own template and parses the model's reply for calls.
Models write calls in a few well-known forms; this module reads all of them, and counts a call only when it
names a tool the request declared (anything else stays text):

- Hermes/Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one or more);
- Mistral: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]``;
- Llama 3.x and most others: a bare JSON object ``{"name": ..., "parameters"|"arguments": {...}}`` or a list.

The worker holds the reply back only while it still *could* be a call (it starts like one); a reply that
starts as prose is streamed as usual.  Calls come out in Ollama's shape (``arguments`` an object, ``index``
always present); the OpenAI layer turns them into its own (``arguments`` a JSON string).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

OPENERS = ("<tool_call>", "[TOOL_CALLS]", "{", "[", "```json", "```")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def could_be_call(text: str) -> bool:
    """Whether text that begins a reply may still turn out to be a tool call (so it must be held back)."""
    head = text.lstrip()
    if not head:
        return True
    return any(head.startswith(o) or o.startswith(head) for o in OPENERS)


def _objects(payload: str) -> list[Any]:
    """JSON values in ``payload``: one value, or several written one after another."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    payload = payload.strip()
    while i < len(payload):
        while i < len(payload) and payload[i] in " \t\r\n,;":
            i += 1
        if i >= len(payload):
            break
        try:
            value, i = decoder.raw_decode(payload, i)
        except json.JSONDecodeError:
            return []
        values.extend(value if isinstance(value, list) else [value])
    return values


def parse_tool_calls(text: str, names: set[str]) -> list[dict[str, Any]]:
    """Ollama ToolCall objects found in a whole reply; empty when it is not (only) tool calls."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    if "<tool_call>" in body:
        candidates = [v for block in _TAGGED.findall(body) for v in _objects(block)]
    elif body.startswith("[TOOL_CALLS]"):
        candidates = _objects(body.removeprefix("[TOOL_CALLS]"))
    elif body.startswith(("{", "[")):
        candidates = _objects(body)
    else:
        return []
    calls: list[dict[str, Any]] = []
    for value in candidates:
        if not isinstance(value, dict):
            return []
        function: dict[str, Any] = value["function"] if isinstance(value.get("function"), dict) else value
        name = function.get("name")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return []
        if name not in names or not isinstance(arguments, dict):
            return []
        calls.append({
            "id": f"call_{secrets.token_hex(4)}",
            "function": {"index": len(calls), "name": name, "arguments": arguments},
        })
    return calls


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama ToolCalls -> OpenAI's ``tool_calls`` (``arguments`` as a JSON string)."""
    return [
        {
            "id": call.get("id") or f"call_{secrets.token_hex(4)}",
            "index": call["function"].get("index", i),
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": json.dumps(call["function"]["arguments"])},
        }
        for i, call in enumerate(calls)
    ]
