"""JSON Schema to llama.cpp grammar (GBNF), bounded: the one conversion both the API (to refuse a schema with a
400 before it is queued) and the worker (to compile it) run, so no schema reaches llama.cpp unmeasured.

``converter``/``rules`` are llama-cpp-python's converter, vendored; ``budget`` holds the limits.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from corral.gbnf.budget import GrammarTooLarge, check_grammar, counting
from corral.gbnf.converter import SchemaConverter

__all__ = ["GrammarTooLarge", "InvalidSchema", "schema_grammar"]


class InvalidSchema(ValueError):
    """The converter could not turn the schema into a grammar (an unsupported construct, a remote ``$ref``, a
    pattern without ``^...$``); the message is the converter's."""


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar llama.cpp compiles for ``schema``; raises :class:`GrammarTooLarge` or
    :class:`InvalidSchema`.  Repeated schemas (a job's million items often share one) are converted once."""
    return _convert(json.dumps(schema, separators=(",", ":")))


@lru_cache(maxsize=256)
def _convert(text: str) -> str:
    # From the JSON text, never the caller's dict: the converter rewrites ``$ref`` values in place.
    schema = json.loads(text)
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        with counting():
            converter.visit(converter.resolve_refs(schema, "stdin"), "")
            gbnf: str = converter.format_grammar()
    except GrammarTooLarge:
        raise
    except RecursionError as exc:
        raise InvalidSchema("the JSON Schema nests too deeply to convert") from exc
    except Exception as exc:  # the converter's asserts, ValueErrors, KeyErrors and TypeErrors on odd schemas
        message = str(exc) or type(exc).__name__
        if message.startswith("Fetching remote schemas"):  # upstream's words are a CLI hint
            message = "a $ref to a remote schema is not fetched; put its definition in the schema"
        raise InvalidSchema(message) from exc
    return check_grammar(gbnf)
