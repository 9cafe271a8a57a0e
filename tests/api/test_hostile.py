"""The red-team list of issue #33, as regression tests in the API tier: each test is named after what it attacks.

Those that need real processes (a crash, a stalled webhook, the time a long chat takes) are in
tests/integration/test_hostile_crashes.py and the other ``test_hostile_*`` files beside this one and there.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from corral.modelfile import render_template
from corral.settings import Settings
from corral.store import ModelStore
from tests.helpers import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

# Each crashed the worker with SIGSEGV (a repetition bound the old regex did not read as a number), or was a 500.
HOSTILE_FORMATS = [
    {"type": "string", "pattern": "^a{0,+20000}$"},
    {"type": "string", "pattern": "^a{0,20_000}$"},
    {"type": "string", "pattern": "^a{0, 20000 }$"},
    {"type": "string", "pattern": "^(ab){0,０２００００}$"},
    {"type": "string", "pattern": "^" + "(a" * 1500 + ")" * 1500 + "$"},
    {"type": "string", "pattern": "abc"},  # no ^...$: an AssertionError in the converter
    {"$ref": "https://example.com/schema.json"},  # a remote $ref: an AssertionError, and never fetched
    {"type": "array", "items": {"type": "string"}, "minItems": 10**12},
]


@pytest.mark.parametrize("schema", HOSTILE_FORMATS)
def test_grammar_bombs_and_unconvertible_formats_are_400s_on_every_route(client: FlaskClient, schema: dict[str, Any]) -> None:
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "format": schema, "options": {"num_predict": 4}})
    assert r.status_code == 400 and r.get_json()["error"].startswith("invalid format: ")
    r = client.post("/api/chat", json={**CHAT, "format": schema})
    assert r.status_code == 400 and r.get_json()["error"].startswith("invalid format: ")
    openai = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = client.post("/v1/chat/completions", json=openai)
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "response_format"
    # Job submission refuses what the sync routes refuse: as JSON, and as JSONL
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "ok"}, {"prompt": "x", "format": schema}]})
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 2: invalid format: ")
    line = json.dumps({"prompt": "x", "format": schema}).encode() + b"\n"
    r = client.post(f"/api/jobs?model={MODEL}", data=line, content_type="application/x-ndjson")
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1: invalid format: ")


def test_grammar_bombs_in_an_openai_batch_file_are_refused(client: FlaskClient) -> None:
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HOSTILE_FORMATS[0]}}}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    upload = client.post("/v1/files", data={"purpose": "batch",
                                            "file": (io.BytesIO(json.dumps(line).encode() + b"\n"), "in.jsonl")})
    assert upload.status_code == 200
    r = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"})
    batch = r.get_json()  # as OpenAI does: the batch is created failed, with the line's error, and nothing runs
    assert (r.status_code, batch["status"]) == (200, "failed")
    assert batch["errors"]["data"][0]["line"] == 1
    assert batch["errors"]["data"][0]["message"].startswith("invalid format: a repetition bound of 20000")


def test_a_schema_within_the_budget_still_passes(client: FlaskClient) -> None:
    """The budget refuses bombs, not ordinary schemas: the old limits (a bound of 1000) still hold."""
    from jobs.ingest import validate_item

    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{0,1000}$"}}}
    assert validate_item("generate", 1, {"prompt": "x", "format": schema})[1]["format"] == schema


def test_deeply_nested_template_is_refused_at_create_and_tags_keep_working(client: FlaskClient) -> None:
    template = "{{if .System}}" * 1200 + "{{ .Prompt }}" + "{{end}}" * 1200
    r = client.post("/api/create", json={"model": "hostile-deep", "from": MODEL, "template": template, "stream": False})
    assert r.status_code == 400 and "nested deeper than" in r.get_json()["error"]
    assert client.get("/api/tags").status_code == 200
    assert "hostile-deep:latest" not in [m["name"] for m in client.get("/api/tags").get_json()["models"]]


def test_printf_with_a_python_format_width_builds_no_large_prompt(client: FlaskClient, settings: Settings) -> None:
    """``printf`` is Go's: ``{:>5000000}`` is text to it, so the prompt stays small (Python's format made it 5 MB)."""
    template = '{{ printf "{:>5000000}" .Prompt }}{{ range .Messages }}{{ .Content }}{{ end }}'
    r = client.post("/api/create", json={"model": "hostile-printf", "from": MODEL, "template": template, "stream": False})
    assert r.status_code == 200
    record = ModelStore(settings.models_path).get("hostile-printf")
    _, fields = render_template(record, "chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert fields["prompt"] == "{:>5000000}%!(EXTRA string=)hi"
    client.delete("/api/delete", json={"model": "hostile-printf"})
