"""corral/toolchoice.py: which tools a request offers and what format it runs with under each ``tool_choice``, and
a forced call's reply read as the call; the grammar of the call schema is the one the worker compiles."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.errors import BadRequest
from corral.gbnf import schema_grammar
from corral.toolchoice import ToolChoice, call_schema


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **({"parameters": parameters} if parameters else {})}}


WEATHER = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
NOOP = tool("noop")


def test_auto_and_none() -> None:
    auto = ToolChoice.from_openai(None).constrain([WEATHER], "json")
    assert (auto.tools, auto.format, auto.forced) == ([WEATHER], "json", frozenset())
    none = ToolChoice.from_openai("none").constrain([WEATHER], None)
    assert (none.tools, none.format) == (None, None)  # not offered at all
    assert none.reply("text", []) == ("text", [])


def test_required_constrains_the_reply_to_one_call_of_any_tool() -> None:
    plan = ToolChoice.from_openai("required").constrain([WEATHER, NOOP], {"type": "object"})
    assert plan.tools == [WEATHER, NOOP] and plan.forced == {"get_weather", "noop"}
    assert [b["properties"]["name"] for b in plan.format["anyOf"]] == [{"const": "get_weather"}, {"const": "noop"}]  # type: ignore[index]
    schema_grammar(plan.format)  # type: ignore[arg-type]
    content, calls = plan.reply('{"name": "get_weather", "arguments": {"city": "Paris"}}', [])
    assert content == "" and calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["function"]["arguments"] == {"city": "Paris"} and calls[0]["id"].startswith("call_")
    assert plan.reply("not json", []) == ("not json", [])  # never invented


@pytest.mark.parametrize("value", [{"type": "function", "name": "noop"}, {"type": "function", "function": {"name": "noop"}}])
def test_a_named_function(value: dict[str, Any]) -> None:
    plan = ToolChoice.from_openai(value).constrain([WEATHER, NOOP], None)
    assert plan.forced == {"noop"} and plan.format["properties"]["name"] == {"const": "noop"}  # type: ignore[index]
    assert plan.format["properties"]["arguments"] == {"type": "object"}  # type: ignore[index]


def test_allowed_tools_narrow_the_offer() -> None:
    value = {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "noop"}]}
    assert ToolChoice.from_openai(value).constrain([WEATHER, NOOP], None).tools == [NOOP]


def test_parameters_with_defs_and_parameters_no_grammar_takes() -> None:
    nested = tool("f", {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
                        "$defs": {"P": {"type": "integer"}}})
    schema = call_schema([nested])
    assert schema["$defs"] == {"P": {"type": "integer"}} and "$defs" not in schema["properties"]["arguments"]
    schema_grammar(schema)
    odd = tool("g", {"type": "object", "properties": {"s": {"type": "string", "pattern": "unanchored"}}})
    loose = call_schema([odd])  # the converter refuses the pattern: the call is still forced, its arguments free
    assert loose["properties"] == {"name": {"const": "g"}, "arguments": {"type": "object"}}
    assert json.loads(json.dumps(odd))["function"]["parameters"]["properties"]["s"]["pattern"] == "unanchored"


def test_two_tools_defining_one_name_differently_hold_neither_to_the_other() -> None:
    def uses(name: str, kind: str) -> dict[str, Any]:
        return tool(name, {"type": "object", "properties": {"x": {"$ref": "#/$defs/T"}}, "$defs": {"T": {"type": kind}}})

    schema = call_schema([uses("a", "integer"), uses("b", "string")])
    assert "$defs" not in schema and schema["properties"]["arguments"] == {"type": "object"}
    assert schema["properties"]["name"] == {"enum": ["a", "b"]}
    same = call_schema([uses("a", "integer"), uses("b", "integer")])  # the same definition twice is no clash
    assert same["$defs"] == {"T": {"type": "integer"}}


@pytest.mark.parametrize(
    ("value", "tools", "message"),
    [
        ("sometimes", [WEATHER], "invalid tool_choice: 'sometimes' (must be 'none', 'auto' or 'required')"),
        ({"type": "function"}, [WEATHER], "tool_choice of type 'function' needs the function's 'name'"),
        ({"type": "web_search"}, [WEATHER], "tool_choice of type 'web_search' is not supported: only function tools run here"),
        ({"type": "function", "name": "x"}, [WEATHER], "tool_choice names function 'x', which is not among the request's tools"),
        ("required", [], "tool_choice requires a tool call, but the request declares no tools"),
        (7, [WEATHER], "invalid tool_choice: a string or an object"),
    ],
)
def test_refusals(value: Any, tools: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(BadRequest) as err:
        ToolChoice.from_openai(value).constrain(tools, None)
    assert err.value.message == message and err.value.param == "tool_choice"
