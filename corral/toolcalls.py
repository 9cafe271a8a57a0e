"""Tool calls in model output: which form a model writes them in, where they start, and how to read them.

Ollama renders ``tools`` into the prompt with the model's own template and parses the reply with the parser of
the model's template family.  Corral chooses the family from the template the same way (the markers it uses)
and recognises a call wherever it starts, after leading prose or whitespace:

- ``hermes`` (Hermes, Qwen 2.5/3, SmolLM3...): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one or more;
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}]``, or the newer ``[TOOL_CALLS]name[ARGS]{...}``;
- ``llama3``: ``<|python_tag|>{"name": ..., "parameters": {...}}`` (several separated by ``;``), or the bare JSON
  object as the whole reply;
- ``deepseek``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` then the arguments in a
  JSON fence (V3), or ``NAME<｜tool▁sep｜>{...}`` (V3.1), each closed by ``<｜tool▁call▁end｜>``;
- ``harmony`` (gpt-oss): ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``;
- ``json`` (any other template): a reply that is only a JSON object or list of calls (in a fence or not).

A call counts only when it names a declared tool with object arguments; anything else stays text.  Calls come
out in Ollama's shape (``arguments`` an object, ``index`` always present); the OpenAI layer makes them its own.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Any

from corral.thinking import held_back

# family -> the marker that starts its calls (the json family has none: the whole reply must be the call).
MARKERS = {
    "hermes": "<tool_call>",
    "mistral": "[TOOL_CALLS]",
    "llama3": "<|python_tag|>",
    "deepseek": "<｜tool▁calls▁begin｜>",
    "harmony": "<|channel|>commentary to=functions.",
    "json": "",
}
JSON_OPENERS = ("{", "[", "```json", "```")
_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", re.S)
_HARMONY_CALL = re.compile(r"to=functions\.([\w.-]+).*?<\|message\|>(.*?)(?:<\|call\|>|$)", re.S)
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def tool_format(template: str) -> str:
    """The family of a chat template (a GGUF's Jinja or an Ollama Go template), from the markers it writes."""
    for family, needles in (("harmony", ("<|channel|>", "to=functions")), ("deepseek", ("tool▁calls▁begin",)),
                            ("mistral", ("[TOOL_CALLS]",)), ("hermes", ("<tool_call>",)),
                            ("llama3", ("<|python_tag|>", "ipython"))):
        if any(needle in template for needle in needles):
            return family
    return "json"


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    names = set()
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def could_be_call(text: str) -> bool:
    """Whether text that begins a reply may still turn out to be a bare JSON call (so it must be held back)."""
    head = text.lstrip()
    if not head:
        return True
    return any(head.startswith(o) or o.startswith(head) for o in JSON_OPENERS)


def _objects(payload: str) -> list[Any]:
    """JSON values in ``payload``: one value, or several written one after another (or separated by ; or ,)."""
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


def _unfence(text: str) -> str:
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    return body


def _candidates(text: str, family: str) -> list[Any]:
    """(name, arguments) dicts or raw call objects written in ``text``, which starts at the family's marker."""
    if family == "hermes":
        return [v for block in _HERMES_CALL.findall(text) for v in _objects(block)]
    if family == "mistral":
        rest = text.removeprefix("[TOOL_CALLS]").strip()
        if "[ARGS]" in rest:  # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name2[ARGS]{...}
            found = []
            for part in rest.split("[TOOL_CALLS]"):
                name, _, args = part.partition("[ARGS]")
                values = _objects(args)
                found.append({"name": name.strip(), "arguments": values[0] if len(values) == 1 else None})
            return found
        return _objects(rest)
    if family == "llama3":
        return _objects(_unfence(text.removeprefix("<|python_tag|>")))
    if family == "deepseek":
        found = []
        for block in _DEEPSEEK_CALL.findall(text):
            head, _, args = block.partition("<｜tool▁sep｜>")
            if head.strip() == "function":  # V3: function<｜tool▁sep｜>NAME\n```json\n{...}\n```
                name, _, args = args.partition("\n")
            else:  # V3.1: NAME<｜tool▁sep｜>{...}
                name = head
            values = _objects(_unfence(args))
            found.append({"name": name.strip(), "arguments": values[0] if len(values) == 1 else None})
        return found
    if family == "harmony":
        found = []
        for name, args in _HARMONY_CALL.findall(text):
            values = _objects(_unfence(args))
            found.append({"name": name, "arguments": values[0] if len(values) == 1 else None})
        return found
    body = _unfence(text)
    return _objects(body) if body.startswith(("{", "[")) else []


def parse_tool_calls(text: str, names: set[str], family: str = "json") -> list[dict[str, Any]]:
    """Ollama ToolCall objects in ``text`` (a reply, or its part from the family's marker on); empty when it
    does not hold only well-formed calls of declared tools."""
    calls: list[dict[str, Any]] = []
    for value in _candidates(text, family):
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
        calls.append({"id": f"call_{secrets.token_hex(4)}",
                      "function": {"index": len(calls), "name": name, "arguments": arguments}})
    return calls


class ToolCallHold:
    """Streams a reply to a request with tools, holding back only what may be a tool call.

    Text before the family's marker streams as it comes (minus a tail that may be the marker's beginning); from
    the marker on it is held and parsed when the reply ends.  A reply that starts like bare JSON is held too
    (every family's models sometimes answer with the call alone).  What does not parse as calls is text after
    all, and is passed on then.
    """

    def __init__(self, names: set[str], emit: Callable[[str], bool], family: str = "json") -> None:
        self.names, self.emit, self.family = names, emit, family
        self.marker = MARKERS.get(family, "")
        self.pending = ""  # not yet passed on: may begin the marker (or a bare JSON call)
        self.call = ""  # from the marker on
        self.started = False  # some text has been passed on, so a bare JSON call is no longer possible

    def feed(self, text: str) -> bool:
        if self.call:
            self.call += text
            return False
        self.pending += text
        if not self.started and could_be_call(self.pending):
            return False
        if self.marker:
            at = self.pending.find(self.marker)
            if at >= 0:
                before, self.call = self.pending[:at], self.pending[at:]
                self.pending = ""
                return self._pass(before)
            keep = held_back(self.pending, self.marker)
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
            return self._pass(out)
        out, self.pending = self.pending, ""
        return self._pass(out)

    def _pass(self, text: str) -> bool:
        if not text:
            return False
        self.started = True
        return self.emit(text)

    def finish(self) -> tuple[list[dict[str, Any]], str]:
        """(tool calls, text still held): the calls found, and whatever held text is not part of them."""
        if self.call:
            calls = parse_tool_calls(self.call, self.names, self.family)
            return (calls, "") if calls else ([], self.pending + self.call)
        if not self.started and self.pending.strip():
            calls = parse_tool_calls(self.pending, self.names)  # the bare JSON answer
            if calls:
                return calls, ""
        return [], self.pending


def split_tool_calls(text: str, names: set[str], family: str = "json") -> tuple[str, list[dict[str, Any]]]:
    """(content, calls) of a whole reply: what a batch item stores."""
    parts: list[str] = []

    def keep(piece: str) -> bool:
        parts.append(piece)
        return False

    hold = ToolCallHold(names, keep, family)
    hold.feed(text)
    calls, rest = hold.finish()
    return "".join(parts) + rest, calls



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
