"""The tables the pages take from the code: the settings (:class:`corral.settings.Settings`) and Ollama's
options (:data:`corral.options.OPTIONS`).

Every setting's environment name, default, accepted values and ``description`` go into ``docs/configuration.md``,
and every option's type, bounds, default and llama.cpp name into ``docs/ollama-api.md``, each between its two
markers below.  MkDocs runs this file as a hook (``hooks:`` in mkdocs.yml), so the site is always built from
the code as it is; the copies checked in, which GitHub shows, are rewritten with ``.venv/bin/python
docs/hooks.py``, and ``tests/unit/test_docs.py`` fails when one is stale.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BEGIN = "<!-- settings: generated from corral/settings.py by docs/hooks.py (run it to update); do not edit -->"
END = "<!-- end of the generated settings -->"
# The tables, by the environment name's prefix, in the order the page shows them.
GROUPS = (
    ("OLLAMA_", "Ollama's variables", "They mean what they mean in Ollama."),
    ("", "Connections", "The conventional names; every process of one deployment needs the same two."),
    ("CORRAL_", "corral's own", ""),
)

if str(ROOT) not in sys.path:  # run as a hook or a script, the repository's packages come first
    sys.path.insert(0, str(ROOT))

from corral.options import OPTIONS  # noqa: E402
from corral.settings import Settings  # noqa: E402

OPTIONS_BEGIN = "<!-- options: generated from corral/options.py by docs/hooks.py (run it to update); do not edit -->"
OPTIONS_END = "<!-- end of the generated options -->"


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables that set ``field`` (its aliases other than the field's own name)."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", [alias] if isinstance(alias, str) else [])
    return [str(c) for c in choices if isinstance(c, str) and c != name]


def env_text(value: Any) -> str:
    """``value`` as it is written in the environment (as :meth:`Settings.environment` writes it)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    return str(value)


def default_cell(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "*unset*"
    text = env_text(value)
    return f"`{text}`" if text else "*empty*"


def values_cell(field: FieldInfo) -> str:
    """What the variable accepts: its type, and the bounds the field declares."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in typing.get_args(annotation))
    kind = {
        bool: "`1` or `0`",
        int: "integer",
        float: "number",
        str: "text",
        Path: "path",
    }.get(annotation, "comma-separated list" if typing.get_origin(annotation) is list else str(annotation))
    bounds = []
    for rule in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            bound = getattr(rule, attr, None)
            if bound is not None:
                bounds.append(f"{sign} {bound:,}")
    return ", ".join([kind, *bounds])


def settings_tables() -> str:
    """The generated block: one table per group, every field of :class:`Settings` in exactly one."""
    rows: dict[str, list[str]] = {prefix: [] for prefix, _, _ in GROUPS}
    for name, field in Settings.model_fields.items():
        names = env_names(name, field)
        if not names:
            continue
        prefix = max((p for p, _, _ in GROUPS if names[0].startswith(p)), key=len)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        variable = ", ".join(f"`{n}`" for n in names)
        rows[prefix].append(f"| {variable} | {default_cell(field)} | {values_cell(field)} | {description} |")
    parts = [BEGIN]
    for prefix, title, intro in GROUPS:
        parts += ["", f"### {title}", ""]
        if intro:
            parts += [intro, ""]
        parts += ["| variable | default | values | meaning |", "|---|---|---|---|", *rows[prefix]]
    parts += ["", END]
    return "\n".join(parts)


def number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def options_table() -> str:
    """The generated block of the Ollama API page: every option corral accepts, in the order Ollama lists them."""
    rows = ["| option | type | range | Ollama's default | part | llama.cpp |", "|---|---|---|---|---|---|"]
    for option in OPTIONS:
        bounds = f"{number(option.low)} to {number(option.high)}" if math.isfinite(option.low) else ""
        if option.default is None:
            default = "*corral's setting or the model's*"
        elif isinstance(option.default, bool):
            default = f"`{str(option.default).lower()}`"
        elif isinstance(option.default, (int, float)):
            default = f"`{number(option.default)}`"
        else:
            default = f"`{list(option.default)}`" if isinstance(option.default, tuple) else f"`{option.default}`"
        llama = f"`{option.llama}`" if option.llama else ""
        rows.append(f"| `{option.name}` | {option.type} | {bounds} | {default} | {option.part} | {llama} |")
    return "\n".join([OPTIONS_BEGIN, "", *rows, "", OPTIONS_END])


# The generated blocks of each page: (first marker, last marker, what goes between them).
BLOCKS: dict[str, tuple[str, str, Callable[[], str]]] = {
    "configuration.md": (BEGIN, END, settings_tables),
    "ollama-api.md": (OPTIONS_BEGIN, OPTIONS_END, options_table),
}


def render(markdown: str, page: str = "configuration.md") -> str:
    """``markdown`` (the page ``page`` of docs/) with its generated block replaced by the current one."""
    begin, end_marker, make = BLOCKS[page]
    start, end = markdown.find(begin), markdown.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"docs/{page} has lost its markers: {begin!r} ... {end_marker!r}")
    return markdown[:start] + make() + markdown[end + len(end_marker):]


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: build the generated blocks from the code, whatever the checked-in copies say."""
    name = page.file.src_uri
    return render(markdown, name) if name in BLOCKS else markdown


if __name__ == "__main__":
    for name in BLOCKS:
        path = DOCS / name
        path.write_text(render(path.read_text(encoding="utf-8"), name), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
