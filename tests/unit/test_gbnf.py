"""The vendored JSON Schema converter (corral/gbnf) and its budget: the grammar llama-cpp-python would write, and
no spelling of a repetition past the budget."""

from __future__ import annotations

import json
from typing import Any

import pytest

from corral.gbnf import GrammarTooLarge, InvalidSchema, schema_grammar
from corral.gbnf.budget import MAX_DEPTH, grammar_depth

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 5},
    {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]+$"},
    {"type": "string", "maxLength": 1000},
    {"enum": ["red", "green", {"x": 1}]},
    {"oneOf": [{"type": "boolean"}, {"type": "null"}, {"const": "x"}]},
    {"type": "object", "additionalProperties": {"type": "string", "format": "date-time"}},
    {"definitions": {"p": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/definitions/p"}}},
    {"type": "object", "properties": {"a": {"type": "string", "format": "uuid"}}, "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_grammar_is_the_one_llama_cpp_python_writes(schema: dict[str, Any]) -> None:
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar")
    assert schema_grammar(schema) == llama_grammar.json_schema_to_gbnf(json.dumps(schema))


@pytest.mark.parametrize("bound", ["+20000", "20_000", " 20000 ", "０２００００", "2" + "0" * 4])
def test_every_spelling_of_a_large_bound_is_refused(bound: str) -> None:
    with pytest.raises(GrammarTooLarge, match="repetition bound of 20000"):
        schema_grammar({"type": "string", "pattern": f"^a{{0,{bound}}}$"})


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "abc"},  # no ^...$
    {"$ref": "https://example.com/schema.json"},
    {"type": "string", "pattern": "^a{x}$"},
    {"type": "array", "items": {"type": "string"}, "maxItems": 2.5},
    {"type": "strange"},
    {"$defs": {"p": {"type": "object", "properties": {"x": {"$ref": "#/$defs/p"}}}}, "$ref": "#/$defs/p"},  # upstream's KeyError
])
def test_what_the_converter_cannot_convert_is_invalid(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidSchema):
        schema_grammar(schema)


def test_huge_counts_are_refused_before_they_are_built() -> None:
    with pytest.raises(GrammarTooLarge):
        schema_grammar({"type": "array", "items": {"type": "string"}, "minItems": 10**12})
    for schema in ({"type": "string", "pattern": "^a{-20000000,0}$"},
                   {"type": "array", "items": {"type": "string"}, "minItems": -20000000, "maxItems": 0}):
        with pytest.raises(GrammarTooLarge, match="negative"):
            schema_grammar(schema)


def test_nesting_is_measured_on_the_written_grammar() -> None:
    assert grammar_depth('root ::= ("(" ("a" [)(] )?)? # ((((\n') == 2
    nested = "^" + "(a" * 1200 + ")" * 1200 + "$"
    with pytest.raises((GrammarTooLarge, InvalidSchema)):
        schema_grammar({"type": "string", "pattern": nested})
    assert grammar_depth(schema_grammar({"type": "string", "maxLength": 1000})) <= MAX_DEPTH


def test_the_callers_schema_is_not_changed() -> None:
    schema = {"definitions": {"p": {"type": "string"}}, "properties": {"a": {"$ref": "#/definitions/p"}}}
    schema_grammar(schema)
    assert schema == {"definitions": {"p": {"type": "string"}}, "properties": {"a": {"$ref": "#/definitions/p"}}}
