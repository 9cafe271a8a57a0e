"""The reference in docs/ agrees with the code: the configuration page lists every setting as ``Settings``
declares it and the Ollama API page every option of ``corral.options`` (``docs/hooks.py`` generates both
tables), and the README stays a short entry whose links lead into docs/.  Links between the pages are checked
by ``mkdocs build --strict`` in ``make check``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from corral.options import OPTIONS
from corral.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_rows(page: str, begin: str, end: str) -> dict[str, str]:
    """The generated block's table rows, by their first environment name."""
    block = page[page.index(begin):page.index(end)]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"\| `([A-Z_]+)`", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_setting_is_on_the_configuration_page(hooks: ModuleType) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = generated_rows(page, hooks.BEGIN, hooks.END)
    for name, field in Settings.model_fields.items():
        env = hooks.env_names(name, field)
        assert env, f"Settings.{name} has no environment variable"
        assert env[0] in rows, f"{env[0]} (Settings.{name}) is missing from docs/configuration.md"
        assert field.description, f"Settings.{name} has no description"
        row = rows[env[0]]
        assert field.description.replace("|", "\\|") in row, f"{env[0]}'s description on the page is not the Field's"
        assert hooks.default_cell(field) in row, f"{env[0]}'s default on the page is not the Field's"
    assert len(rows) == len(Settings.model_fields), "the page lists a variable that Settings does not have"


@pytest.mark.parametrize("name", ["configuration.md", "ollama-api.md"])
def test_the_checked_in_pages_are_current(hooks: ModuleType, name: str) -> None:
    page = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert hooks.render(page, name) == page, f"docs/{name} is stale: run .venv/bin/python docs/hooks.py"


def test_every_option_is_on_the_ollama_api_page(hooks: ModuleType) -> None:
    page = (ROOT / "docs" / "ollama-api.md").read_text(encoding="utf-8")
    block = page[page.index(hooks.OPTIONS_BEGIN):page.index(hooks.OPTIONS_END)]
    for option in OPTIONS:
        assert f"| `{option.name}` |" in block, f"option {option.name} is missing from docs/ollama-api.md"
    for option in (o for o in OPTIONS if o.part == "ignored"):
        # the prose says why each accepted-and-ignored option is ignored
        assert f"`{option.name}` (" in page.split("Accepted and ignored", 1)[1], option.name


def test_the_generated_table_follows_the_field(hooks: ModuleType) -> None:
    # the generator reads the declaration itself: type, bounds, and the default as the environment writes it
    fields = Settings.model_fields
    assert hooks.values_cell(fields["num_parallel"]) == "integer, ≥ 0, ≤ 256"
    assert hooks.values_cell(fields["cpu_weights"]) == "one of `auto`, `native`, `q8_0`, `bf16`"
    assert hooks.default_cell(fields["prefix_grouping"]) == "`1`"
    assert hooks.default_cell(fields["home"]) == "`~/.corral`"
    assert hooks.default_cell(fields["redis_url"]) == "*unset*"
    assert hooks.env_names("host", fields["host"]) == ["OLLAMA_HOST"]


def test_the_readme_is_an_entry_not_the_reference() -> None:
    text = README.read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:40])
    assert "make run" in head and "make test" in head
    assert len(text.splitlines()) <= 220, "the README is the entry; the reference belongs in docs/"
    # the configuration table lives in docs/configuration.md only
    assert "CORRAL_VISIBILITY_TIMEOUT" not in text


def test_the_readme_links_lead_somewhere() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        if target.startswith(("http://", "https://", "#")):
            continue
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README links to {target}, which does not exist"
