"""The part of Go's ``text/template`` that Ollama's model templates use, to render a model's TEMPLATE layer.

No maintained Python package implements Go templates, so this is a small one, tested on its own
(tests/unit/test_gotemplate.py).  Supported: text with ``{{ }}`` actions and ``{{-``/``-}}`` trimming, comments,
fields (``.Messages``, ``$.System``, ``$m.Role``), variables (``$x := ...``, ``$x = ...``), ``if``/``else if``/
``else``, ``range`` (with ``$i, $v :=`` and ``else``), ``with``, ``break``/``continue``, pipelines (``x | f``),
parenthesized pipelines, string, number, boolean and nil literals, and the functions ``and or not eq ne lt le gt
ge len index slice print printf json`` (``printf`` is Go's, corral/modelstore/goprintf.py).  Blocks and parentheses nest
at most :data:`MAX_NESTING` deep and a render's output is bounded, so an admin's or a registry's template cannot
take the server down.  Anything else (``define``, ``template``, ``block``, other functions) is a
:class:`TemplateError` when the template is parsed, at ``/api/create``, never a wrong prompt at chat time.

Field names are Go's (``.Role``, ``.ToolCalls``); the data is JSON-shaped dicts (``role``, ``tool_calls``), so a
field is looked up as written, then lower camel, then snake case, and ``json`` prints the JSON as Ollama does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from corral.errors import BadRequest
from corral.modelstore.goprintf import sprintf


class TemplateError(BadRequest):
    """A template outside the supported subset, or malformed."""


# Bounds a template (admin-created or pulled) cannot get past.  Ollama's library templates nest their blocks and
# parentheses at most about six deep; 1,200 nested ``{{if}}`` blocks once made every /api/tags answer a 500
# RecursionError.  A render's output is bounded too: a ``range`` over the messages inside a ``range`` over the
# messages would otherwise square a long chat.
MAX_NESTING = 100
MAX_OUTPUT = 16 << 20  # characters a render writes, and the longest string an action may build
MAX_STEPS = 2_000_000  # actions and range iterations one render runs (a 20,000-message chat: about 200,000)
MAX_PRINTF_WIDTH = 1000  # a printf width or precision past this prints %!(BADWIDTH) / %!(BADPREC)

FUNCTIONS = ("and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index", "slice", "print", "printf", "json")
_TOKEN = re.compile(
    r'\s+|(?P<str>"(?:\\.|[^"\\])*"|`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|(?P<var>\$[A-Za-z0-9_]*)'
    r"|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>:=|=|\||\(|\)|,)"
)
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


# -- parsing --------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    kind: str  # text, output, if, range, with, set, break, continue
    text: str = ""
    pipe: Any = None  # a pipeline: list of commands; a command: list of operands
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # variables declared (range, :=) or assigned (=)
    declare: bool = True


def _lex(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"template: unexpected {text[pos:pos + 10]!r} in an action")
        pos = m.end()
        if m.lastgroup:
            tokens.append((m.lastgroup, m.group(m.lastgroup)))
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], depth: int = 0) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = depth  # blocks around this action, plus parentheses open in it

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise TemplateError("template: unexpected end of an action")
        self.i += 1
        return token

    def pipeline(self) -> list[list[Any]]:
        commands = [self.command()]
        while self.peek() == ("op", "|"):
            self.take()
            commands.append(self.command())
        return commands

    def command(self) -> list[Any]:
        operands: list[Any] = []
        while (token := self.peek()) is not None and token not in (("op", "|"), ("op", ")")):
            operands.append(self.operand())
        if not operands:
            raise TemplateError("template: missing value in an action")
        return operands

    def operand(self) -> Any:
        kind, value = self.take()
        if kind == "op" and value == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise TemplateError(f"template: nested deeper than {MAX_NESTING} levels")
            inner = self.pipeline()
            self.depth -= 1
            if self.take() != ("op", ")"):
                raise TemplateError("template: unclosed parenthesis")
            node: Any = ("pipe", inner)
            nxt = self.peek()
            if nxt and nxt[0] == "field" and nxt[1] != ".":
                node = ("chain", node, self.take()[1])
            return node
        if kind == "str":
            return ("lit", value[1:-1] if value.startswith("`") else json.loads(value))
        if kind == "num":
            return ("lit", float(value) if "." in value else int(value))
        if kind == "ident":
            if value in ("true", "false"):
                return ("lit", value == "true")
            if value == "nil":
                return ("lit", None)
            if value not in FUNCTIONS:
                raise TemplateError(f'template: function "{value}" not defined')
            return ("func", value)
        if kind == "var":
            nxt = self.peek()
            if nxt and nxt[0] == "field" and nxt[1] != ".":
                return ("var", value, self.take()[1])
            return ("var", value, "")
        if kind == "field":
            return ("field", value)
        raise TemplateError(f"template: unexpected {value!r} in an action")


def parse(text: str) -> list[_Node]:
    """Parse a template; raise :class:`TemplateError` for anything outside the subset."""
    if not isinstance(text, str):
        raise TemplateError("template: must be a string")
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        if chunk:
            stack[-1][1].append(_Node("text", text=chunk))
        pos, trim_next = m.end(), bool(m.group(3))
        action = m.group(2).strip()
        if action.startswith("/*"):
            if not action.endswith("*/"):
                raise TemplateError("template: unclosed comment")
            continue
        word, _, rest = action.partition(" ")
        rest = rest.strip()
        parent, body = stack[-1]
        if word in ("if", "with", "range"):
            node = _Node(word)
            tokens = _lex(rest)
            if word == "range":
                node.names, tokens = _declarations(tokens)
            parser = _Parser(tokens, len(stack))
            node.pipe = parser.pipeline()
            if parser.peek() is not None:
                raise TemplateError(f"template: unexpected {parser.peek()[1]!r} in {word}")  # type: ignore[index]
            body.append(node)
            stack.append((node, node.body))
            if len(stack) > MAX_NESTING:
                raise TemplateError(f"template: nested deeper than {MAX_NESTING} levels")
        elif word == "else":
            if parent is None or parent.kind not in ("if", "with", "range") or body is parent.orelse:
                raise TemplateError("template: unexpected {{else}}")
            if rest.startswith("if "):  # else if: a nested if in the else branch, closed by the same end
                nested = _Node("if", pipe=_Parser(_lex(rest[3:]), len(stack)).pipeline())
                nested.text = "elseif"
                parent.orelse.append(nested)
                stack[-1] = (parent, parent.orelse)
                stack.append((nested, nested.body))
                if len(stack) > MAX_NESTING:  # a chain of else ifs nests as deep in the tree
                    raise TemplateError(f"template: nested deeper than {MAX_NESTING} levels")
            else:
                stack[-1] = (parent, parent.orelse)
        elif word == "end":
            if parent is None:
                raise TemplateError("template: unexpected {{end}}")
            closed, _ = stack.pop()
            while closed is not None and closed.text == "elseif":  # one end closes a whole if / else if chain
                closed, _ = stack.pop()
        elif word in ("break", "continue"):
            if not any(n is not None and n.kind == "range" for n, _ in stack):
                raise TemplateError(f"template: {{{{{word}}}}} outside {{{{range}}}}")
            body.append(_Node(word))
        elif word in ("define", "template", "block"):
            raise TemplateError(f"template: {{{{{word}}}}} is not supported")
        else:
            tokens = _lex(action)
            names, tokens = _declarations(tokens, assign_ok=True)
            parser = _Parser(tokens, len(stack))
            pipe = parser.pipeline()
            if parser.peek() is not None:
                raise TemplateError(f"template: unexpected {parser.peek()[1]!r}")  # type: ignore[index]
            if names:
                body.append(_Node("set", pipe=pipe, names=names, declare=names[-1] != "="))
                body[-1].names = [n for n in names if n != "="]
            else:
                body.append(_Node("output", pipe=pipe))
    tail = text[pos:]
    if "{{" in tail:
        raise TemplateError("template: unclosed action")
    if trim_next:
        tail = tail.lstrip()
    if tail:
        root.append(_Node("text", text=tail))
    if len(stack) != 1:
        raise TemplateError(f"template: unexpected EOF: {{{{{stack[-1][0].kind}}}}} has no {{{{end}}}}")  # type: ignore[union-attr]
    return root


# -- what a template reads (Ollama derives a model's capabilities from it) ------------------------------------


def _pipe_fields(pipe: Any) -> Iterator[str]:
    """The first name of each field a pipeline reads: ``.Messages``, ``$.Tools``, ``$m.Thinking``."""
    for command in pipe or []:
        for op in command:
            yield from _operand_fields(op)


def _operand_fields(op: Any) -> Iterator[str]:
    if op[0] == "field" and op[1] != ".":
        yield op[1].lstrip(".").split(".")[0]
    elif op[0] == "var" and op[2]:
        yield op[2].lstrip(".").split(".")[0]
    elif op[0] == "pipe":
        yield from _pipe_fields(op[1])
    elif op[0] == "chain":
        yield from _operand_fields(op[1])


def variables(nodes: list[_Node]) -> set[str]:
    """The lower-cased names of the fields a template reads, as Ollama's ``Template.Vars`` (``tools``: the model
    takes tools; ``suffix``: it fills in the middle)."""
    found: set[str] = set()
    for node in nodes:
        found.update(name.lower() for name in _pipe_fields(node.pipe))
        found |= variables(node.body) | variables(node.orelse)
    return found


def thinking_tags(nodes: list[_Node]) -> tuple[str, str]:
    """The tags around a message's thinking, as Ollama's ``thinking.InferTags`` finds them: where ``.Thinking`` is
    read inside a ``range`` over ``.Messages``, the first and last text of the nearest enclosing block (for
    ``{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}``: ``<think>`` and ``</think>``)."""
    tags = ("", "")

    def visit(body: list[_Node], in_messages: bool) -> None:
        nonlocal tags
        for node in body:
            fields = set(_pipe_fields(node.pipe))
            if in_messages and "Thinking" in fields:
                first, last = body[0], body[-1]
                tags = (first.text.strip() if first.kind == "text" else "", last.text.strip() if last.kind == "text" else "")
            if node.kind in ("if", "with", "range"):
                inner = "Messages" in fields if node.kind == "range" else in_messages
                visit(node.body, inner)
                visit(node.orelse, inner)

    visit(nodes, False)
    return tags


def _declarations(tokens: list[tuple[str, str]], *, assign_ok: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """``$i, $v :=`` (or ``$x =``) at the start of an action: the variable names and the remaining tokens."""
    names: list[str] = []
    i = 0
    while i < len(tokens) and tokens[i][0] == "var":
        names.append(tokens[i][1])
        i += 1
        if i < len(tokens) and tokens[i] == ("op", ","):
            i += 1
            continue
        break
    if names and i < len(tokens) and tokens[i][0] == "op" and tokens[i][1] in (":=", "="):
        if tokens[i][1] == "=" and not assign_ok:
            raise TemplateError("template: range can only declare variables")
        return (names + (["="] if tokens[i][1] == "=" else [])), tokens[i + 1:]
    return [], tokens


# -- rendering ------------------------------------------------------------------------------------------------


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _lookup(value: Any, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        for key in (name, name[:1].lower() + name[1:], re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()):
            if key in value:
                return value[key]
        return None
    raise TemplateError(f"template: can't evaluate field {name} in type {type(value).__name__}")


def _fields(value: Any, path: str) -> Any:
    for name in path.split(".")[1:]:
        value = _lookup(value, name)
    return value


def truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    return bool(value) if value is not None else False


def _text(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _call(name: str, args: list[Any]) -> Any:
    value = _function(name, args)
    if isinstance(value, str) and len(value) > MAX_OUTPUT:  # $x = print $x $x, doubled per message
        raise TemplateError(f"template: {name} built a string longer than {MAX_OUTPUT} characters")
    return value


def _function(name: str, args: list[Any]) -> Any:
    if name == "and":
        result = args[0] if args else None
        for arg in args:
            result = arg
            if not truth(arg):
                return arg
        return result
    if name == "or":
        for arg in args:
            if truth(arg):
                return arg
        return args[-1] if args else None
    if name == "not":
        return not truth(args[0])
    if name in ("eq", "ne"):
        hit = any(args[0] == other for other in args[1:])
        return hit if name == "eq" else not hit
    if name in ("lt", "le", "gt", "ge"):
        a, b = args[0], args[1]
        return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]
    if name == "len":
        return len(args[0] or [])
    if name == "index":
        value = args[0]
        for key in args[1:]:
            value = value[key]
        return value
    if name == "slice":
        value = args[0]
        return value[args[1] if len(args) > 1 else 0: args[2] if len(args) > 2 else None]
    if name == "print":
        return "".join(_text(a) for a in args)
    if name == "printf":
        if not args or not isinstance(args[0], str):
            raise TemplateError("template: printf: the format must be a string")
        return sprintf(args[0], args[1:])
    if name == "json":
        return json.dumps(args[0], ensure_ascii=False, separators=(",", ":"))
    raise TemplateError(f'template: function "{name}" not defined')


@dataclass
class _Scope:
    dot: Any
    variables: dict[str, Any]


def _eval_pipe(pipe: list[list[Any]], scope: _Scope) -> Any:
    value: Any = None
    for n, command in enumerate(pipe):
        extra = [value] if n else []
        value = _eval_command(command, scope, extra)
    return value


def _eval_command(command: list[Any], scope: _Scope, extra: list[Any]) -> Any:
    head = command[0]
    if head[0] == "func":
        args = [_eval_operand(op, scope) for op in command[1:]] + extra
        return _call(head[1], args)
    if len(command) > 1 or extra:
        raise TemplateError("template: can't give arguments to a non-function")
    return _eval_operand(head, scope)


def _eval_operand(op: Any, scope: _Scope) -> Any:
    kind = op[0]
    if kind == "lit":
        return op[1]
    if kind == "field":
        return scope.dot if op[1] == "." else _fields(scope.dot, op[1])
    if kind == "var":
        if op[1] not in scope.variables:
            raise TemplateError(f"template: undefined variable {op[1]}")
        return _fields(scope.variables[op[1]], op[2]) if op[2] else scope.variables[op[1]]
    if kind == "pipe":
        return _eval_pipe(op[1], scope)
    if kind == "chain":
        return _fields(_eval_operand(op[1], scope), op[2])
    if kind == "func":
        return _call(op[1], [])
    raise TemplateError(f"template: unexpected {op!r}")


class RenderBudget:
    """What renders may cost in all: :data:`MAX_OUTPUT` characters written and :data:`MAX_STEPS` steps.  One
    render has its own; an older template's one-render-per-turn prompt shares one across its turns."""

    def __init__(self) -> None:
        self.size = 0
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateError(f"template: the render takes more than {MAX_STEPS} steps")


class _Output:
    """A render's text so far, within its budget."""

    def __init__(self, budget: RenderBudget) -> None:
        self.parts: list[str] = []
        self.budget = budget

    def append(self, text: str) -> None:
        self.budget.size += len(text)
        if self.budget.size > MAX_OUTPUT:
            raise TemplateError(f"template: the rendered prompt is longer than {MAX_OUTPUT} characters")
        self.parts.append(text)


def _run(nodes: list[_Node], scope: _Scope, out: _Output) -> None:
    for node in nodes:
        out.budget.step()
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            out.append(_text(_eval_pipe(node.pipe, scope)))
        elif node.kind == "set":
            value = _eval_pipe(node.pipe, scope)
            for name in node.names:
                if not node.declare and name not in scope.variables:
                    raise TemplateError(f"template: undefined variable {name}")
                scope.variables[name] = value
        elif node.kind == "if":
            _run(node.body if truth(_eval_pipe(node.pipe, scope)) else node.orelse, scope, out)
        elif node.kind == "with":
            value = _eval_pipe(node.pipe, scope)
            if truth(value):
                _run(node.body, _Scope(value, scope.variables), out)
            else:
                _run(node.orelse, scope, out)
        elif node.kind == "range":
            _range(node, scope, out)
        elif node.kind == "break":
            raise _Break
        elif node.kind == "continue":
            raise _Continue


def _range(node: _Node, scope: _Scope, out: _Output) -> None:
    value = _eval_pipe(node.pipe, scope)
    items = list(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
    if not items:
        _run(node.orelse, scope, out)
        return
    for key, item in items:
        out.budget.step()
        variables = dict(scope.variables)
        if len(node.names) == 2:
            variables[node.names[0]], variables[node.names[1]] = key, item
        elif node.names:
            variables[node.names[0]] = item
        try:
            _run(node.body, _Scope(item, variables), out)
        except _Continue:
            continue
        except _Break:
            break
        finally:
            for name in scope.variables:  # assignments to outer variables stay visible, as in Go
                if name not in node.names:
                    scope.variables[name] = variables[name]


def render(nodes: list[_Node], data: dict[str, Any], budget: RenderBudget | None = None) -> str:
    """Execute a parsed template with ``data`` as ``.`` and ``$``, within ``budget`` (a new one by default)."""
    out = _Output(budget or RenderBudget())
    try:
        _run(nodes, _Scope(data, {"$": data}), out)
    except (TypeError, KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise TemplateError(f"template: {type(exc).__name__}: {exc}") from exc
    return "".join(out.parts)
