"""What a ``format`` JSON Schema may ask of llama.cpp's grammar, measured on the converter's own numbers.

A schema's repetition bound (``maxLength``, ``maxItems``, a pattern's ``{m,n}``) becomes a nesting of optional
groups as deep as the bound: ``(c (c (c)?)?)?``.  llama.cpp parses that nesting recursively, and deep enough
it overflows the stack and the worker dies with SIGSEGV (``^a{0,+20000}$`` did, through a regex that did not
read ``+20000`` as a number while the converter's ``int()`` does).  So the budget is not read from the schema
by a second parser of our own: the vendored converter (corral/gbnf/rules.py) calls :func:`check_repetition`
with the very numbers it is about to expand, and :func:`check_grammar` then measures the grammar it wrote,
which is byte for byte what the worker hands llama.cpp.  No spelling of a number, and no construct other than
repetition that nests (a long property name's ``not_literal``, nested pattern groups), gets past both.

Measured with SmolLM2 and llama-cpp-python 0.3.36 (``llama_sampler_init_grammar`` on a worker-like thread with
the default 8 MB stack): a grammar nesting 1,000 groups compiles, 1,001 to about 18,400 are refused (the
sampler comes back null), and about 18,500 or more crash the process with SIGSEGV.  So the depth limit is
llama.cpp's own 1,000, and everything the API accepts compiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

MAX_REPEAT = 1000  # one repetition's count
MAX_EXPANSION = 4000  # all of one schema's repetitions together
MAX_DEPTH = 1000  # nested groups in the written grammar: llama.cpp refuses deeper ones
MAX_GRAMMAR_BYTES = 1 << 20


class GrammarTooLarge(ValueError):
    """The schema's grammar is past the budget; the message says which limit, in the API's words."""


@dataclass
class _Budget:
    expansion: int = 0


_current: ContextVar[_Budget | None] = ContextVar("corral_gbnf_budget", default=None)


@contextmanager
def counting() -> Iterator[None]:
    """Count the repetitions of one conversion (outside one, as for the converter's built-in rules, nothing is
    counted)."""
    token = _current.set(_Budget())
    try:
        yield
    finally:
        _current.reset(token)


def check_repetition(item_rule: str, min_items: object, max_items: object) -> None:
    """Refuse a repetition before the converter expands it.  Values that are not integers are left to the
    converter, which fails on them (and that failure is a 400 too)."""
    state = _current.get()
    if state is None:
        return
    counts = [n for n in (min_items, max_items) if isinstance(n, int)]
    if not counts:
        return
    if min(counts) < 0:  # upstream expands max - min optional items: -20000000..0 is twenty million of them
        raise GrammarTooLarge(f"a repetition bound of {min(counts)} is negative")
    count = max(counts)
    if count > MAX_REPEAT:
        raise GrammarTooLarge(f"a repetition bound of {count} is above the {MAX_REPEAT} the grammar supports")
    state.expansion += max(count, 0)
    if state.expansion > MAX_EXPANSION:
        raise GrammarTooLarge(f"the JSON Schema's repetition bounds add up to more than {MAX_EXPANSION}")
    if len(item_rule) * max(count, 0) > MAX_GRAMMAR_BYTES:
        raise GrammarTooLarge(f"the grammar would be larger than {MAX_GRAMMAR_BYTES} bytes")


def grammar_depth(gbnf: str) -> int:
    """The deepest nesting of groups in a GBNF text, outside its string literals, character classes and comments
    (the recursion llama.cpp's parser makes)."""
    depth = deepest = 0
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c == '"' or c == "[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "#":
            while i < n and gbnf[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def check_grammar(gbnf: str) -> str:
    """The grammar, when its size and nesting are within the budget."""
    if len(gbnf) > MAX_GRAMMAR_BYTES:
        raise GrammarTooLarge(f"the grammar is larger than {MAX_GRAMMAR_BYTES} bytes")
    depth = grammar_depth(gbnf)
    if depth > MAX_DEPTH:
        raise GrammarTooLarge(f"the grammar nests {depth} groups deep; at most {MAX_DEPTH}")
    return gbnf
