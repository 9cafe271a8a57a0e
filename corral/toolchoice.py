"""``tool_choice`` honoured at the request level, for every wire format that has one (OpenAI Responses and Chat,
Anthropic Messages): which tools the model sees, and whether its reply must be a call.

Ollama decodes none of them (its Responses layer has a TODO saying ``required`` cannot be enforced).  corral can
enforce it without touching the worker, because a request's ``format`` is a grammar the sampler obeys:

- ``auto``: the tools as given; the model may answer or call.
- ``none``: the tools are dropped from the request, so the template never offers them and the reply is text
  (a model without the ``tools`` capability can then serve the request too).
- ``required`` (Anthropic's ``any``), or one named function (Anthropic's ``tool``): the reply is constrained by
  a JSON-schema ``format`` of the call object, ``{"name": <one of the allowed names>, "arguments": <that
  tool's parameters>}``.  The worker's tool-call parser reads such a reply as a call already (a bare JSON call
  is one of the shapes every family accepts, corral/toolcalls.py); :meth:`Constrained.reply` makes sure of it
  for a reply the parser left as text, so a forced call always comes back as a call.

Usage, whatever the wire format (tools are Ollama's ``{"type": "function", "function": {...}}`` shape)::

    choice = ToolChoice.from_openai(body.tool_choice)            # or ToolChoice("required", name="get_weather")
    plan = choice.constrain(native_tools, native_format)          # 400 for a name that is not a declared tool
    svc.request(..., tools=plan.tools, format=plan.format)
    content, calls = plan.reply(final["message"]["content"], final["message"].get("tool_calls") or [])

A forced call's format replaces the request's own ``format`` (the call must be JSON of its own shape).  When
a tool's parameters cannot become a grammar (an unsupported construct, or too large), its ``arguments`` are
constrained only to be a JSON object, so the choice is still honoured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.errors import BadRequest
from corral.toolcalls import parse_tool_calls, tool_names
from corral.wire.ollama import check_schema_budget

Mode = Literal["auto", "none", "required"]


@dataclass(frozen=True)
class ToolChoice:
    """A wire format's ``tool_choice``: ``mode`` and, for a named function, ``name``; ``allowed`` narrows the
    tools to those names (OpenAI's ``allowed_tools``)."""

    mode: Mode = "auto"
    name: str | None = None
    allowed: frozenset[str] | None = None

    @classmethod
    def from_openai(cls, value: Any, *, param: str = "tool_choice") -> ToolChoice:
        """OpenAI's ``tool_choice`` (Responses and Chat Completions): ``"none"``, ``"auto"``, ``"required"``,
        ``{"type": "function", "name": ...}`` (Chat nests it: ``{"function": {"name": ...}}``), or
        ``{"type": "allowed_tools", "mode": "auto"|"required", "tools": [{"type": "function", "name": ...}]}``."""
        if value is None:
            return cls()
        if isinstance(value, str):
            if value in ("none", "auto", "required"):
                return cls(value)  # type: ignore[arg-type]
            raise BadRequest(f"invalid tool_choice: '{value}' (must be 'none', 'auto' or 'required')", param=param)
        if isinstance(value, dict):
            kind = value.get("type")
            if kind == "function":
                function = value.get("function")
                name = (function or {}).get("name") if isinstance(function, dict) else value.get("name")
                if not isinstance(name, str) or not name:
                    raise BadRequest("tool_choice of type 'function' needs the function's 'name'", param=param)
                return cls("required", name=name)
            if kind == "allowed_tools":
                mode = value.get("mode", "auto")
                tools = value.get("tools")
                if mode not in ("auto", "required") or not isinstance(tools, list):
                    raise BadRequest("tool_choice 'allowed_tools' needs mode 'auto' or 'required' and a list of tools",
                                     param=param)
                names = {str(t.get("name") or (t.get("function") or {}).get("name") or "")
                         for t in tools if isinstance(t, dict)}
                return cls(mode, allowed=frozenset(n for n in names if n))
            raise BadRequest(f"tool_choice of type '{kind}' is not supported: only function tools run here", param=param)
        raise BadRequest("invalid tool_choice: a string or an object", param=param)

    def constrain(self, tools: list[dict[str, Any]] | None, fmt: str | dict[str, Any] | None,
                  *, param: str = "tool_choice") -> Constrained:
        """The request's ``tools`` and ``format`` under this choice (Ollama-shaped tools, Ollama's ``format``)."""
        declared = list(tools or [])
        if self.allowed is not None:
            declared = [t for t in declared if _name(t) in self.allowed]
        if self.mode == "none" or not declared:
            if self.mode == "required":
                what = f"function '{self.name}'" if self.name else "a tool call"
                raise BadRequest(f"tool_choice requires {what}, but the request declares no tools", param=param)
            return Constrained(None, fmt)
        if self.mode == "auto":
            return Constrained(declared, fmt)
        if self.name is not None:
            chosen = [t for t in declared if _name(t) == self.name]
            if not chosen:
                raise BadRequest(f"tool_choice names function '{self.name}', which is not among the request's tools",
                                 param=param)
        else:
            chosen = declared
        return Constrained(declared, call_schema(chosen), forced=frozenset(_name(t) for t in chosen))


@dataclass(frozen=True)
class Constrained:
    """What a request runs with under a :class:`ToolChoice`: its ``tools`` (None: none offered) and ``format``,
    and the names of which one call is forced (empty: the model may answer in text)."""

    tools: list[dict[str, Any]] | None
    format: str | dict[str, Any] | None
    forced: frozenset[str] = field(default_factory=frozenset)

    def reply(self, content: str, calls: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """A finished reply's (content, Ollama tool calls): a forced call the worker left as text (its JSON is
        the call object the grammar shaped) becomes the call."""
        if not self.forced or calls:
            return content, calls
        found = parse_tool_calls(content, set(self.forced))
        return ("", found) if found else (content, calls)


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON Schema of one call of any of ``tools``: ``{"name": const, "arguments": parameters}`` per tool,
    in an ``anyOf`` when there are several; ``$defs`` of the parameters move to the root, where their
    ``#/$defs/...`` references point."""
    defs: dict[str, Any] = {}
    branches = []
    clash = False
    for tool in tools:
        parameters = _parameters(tool)
        for name, definition in (parameters.pop("$defs", None) or {}).items():
            clash = clash or (name in defs and defs[name] != definition)
            defs[name] = definition
        branches.append(_branch(_name(tool), parameters))
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    try:
        if clash:  # two tools define one name differently: neither may be held to the other's definition
            raise BadRequest("the tools' $defs clash")
        check_schema_budget(schema)
        return schema
    except BadRequest:  # the parameters do not make a grammar: constrain the call's shape, not its arguments
        names = [_name(t) for t in tools]
        loose = _branch(names[0], {"type": "object"})
        if len(names) > 1:
            loose["properties"]["name"] = {"enum": names}
        return loose


def _branch(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"]}


def _name(tool: dict[str, Any]) -> str:
    names = tool_names([tool])
    return next(iter(names)) if names else ""


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """A copy of the tool's parameters schema (an object schema when it has none)."""
    parameters = (tool.get("function") or {}).get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        return {"type": "object"}
    copied: dict[str, Any] = json.loads(json.dumps(parameters))
    return copied
