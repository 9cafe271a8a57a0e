"""The configuration page's tables, generated from :class:`corral.settings.Settings`.

Every field's environment name, default, accepted values and ``description`` go into ``docs/configuration.md``
between the two markers below.  MkDocs runs this file as a hook (``hooks:`` in mkdocs.yml), so the site is
always built from the settings as they are; the copy checked in, which GitHub shows, is rewritten with
``.venv/bin/python docs/hooks.py``, and ``tests/unit/test_docs.py`` fails when it is stale.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
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

from corral.settings import Settings  # noqa: E402


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


def render(markdown: str) -> str:
    """``markdown`` (the configuration page) with its generated block replaced by the current one."""
    start, end = markdown.find(BEGIN), markdown.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/configuration.md has lost its markers: {BEGIN!r} ... {END!r}")
    return markdown[:start] + settings_tables() + markdown[end + len(END):]


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: build the configuration page from the settings, whatever the checked-in copy says."""
    return render(markdown) if page.file.src_uri == "configuration.md" else markdown


if __name__ == "__main__":
    PAGE.write_text(render(PAGE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
