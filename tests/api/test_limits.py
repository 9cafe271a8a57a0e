"""Every value that reaches llama.cpp is bounded at the door, with a clear 400 in the route family's shape, and
the same checks guard job lines at submission (issue: one request must not hurt another)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from api import create_app
from corral.settings import Settings
from jobs.keys import KeyStore
from tests.helpers import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"repeat_last_n": 2147483647}, 'option "repeat_last_n" must be between -1 and 131072'),
        ({"num_thread": 2000}, 'option "num_thread" must be between 0 and 256'),
        ({"num_ctx": 0}, 'option "num_ctx" must be between 1 and 131072'),
        ({"top_p": 1.5}, 'option "top_p" must be between 0 and 1'),
        ({"temperature": -1}, 'option "temperature" must be between 0 and 100'),
        ({"stop": ["x"] * 17}, 'option "stop" takes at most 16 strings of at most 256 characters'),
        ({"stop": ["x" * 257]}, 'option "stop" takes at most 16 strings of at most 256 characters'),
    ],
)
def test_options_out_of_range_are_400s(client: FlaskClient, options: dict[str, Any], message: str) -> None:
    r = client.post("/api/chat", json={**CHAT, "options": options})
    assert (r.status_code, r.get_json()) == (400, {"error": message})
    r = client.post("/v1/chat/completions", json={**CHAT, "options": options})
    assert r.status_code == 400 and r.get_json()["error"]["message"] == message
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x", "options": options}]})
    assert (r.status_code, r.get_json()) == (400, {"error": f"line 1: {message}"})


def test_a_non_finite_number_is_not_json(client: FlaskClient) -> None:
    r = client.post("/api/chat", data=b'{"model": "smollm2", "messages": [], "options": {"temperature": NaN}}')
    assert (r.status_code, r.get_json()) == (400, {"error": "invalid character 'N' looking for beginning of value"})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 20000},  # crashed the worker with SIGSEGV in llama.cpp's grammar
        {"type": "array", "items": {"type": "string"}, "maxItems": 100000},
        {"type": "string", "pattern": "^a{0,50000}$"},
        {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 900} for i in range(6)}},
    ],
)
def test_format_schemas_past_the_grammar_budget_are_400s(client: FlaskClient, schema: dict[str, Any]) -> None:
    r = client.post("/api/chat", json={**CHAT, "format": schema})
    assert r.status_code == 400 and r.get_json()["error"].startswith("invalid format: ")
    openai = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = client.post("/v1/chat/completions", json=openai)
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "response_format"
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x", "format": schema}]})
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1: invalid format: ")



def test_context_ids_outside_the_vocabulary_are_400s(client: FlaskClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "context": [1, 2, 10_000_000]}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 400
    assert r.get_json()["error"] == "invalid context: token id 10000000 is outside the model's vocabulary (0 to 49151)"
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "hi"}, {"prompt": "hi", "context": [-1]}]})
    assert r.status_code == 400 and r.get_json()["error"].startswith("item 2: invalid context: token id -1")


def test_embedding_inputs_are_counted(client: FlaskClient) -> None:
    many = ["a"] * 2049
    r = client.post("/api/embed", json={"model": "all-minilm", "input": many})
    assert r.status_code == 400
    assert r.get_json() == {"error": "too many inputs: 2049; at most 2048 per request (use a job for more)"}
    r = client.post("/v1/embeddings", json={"model": "all-minilm", "input": many})
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "input"
    r = client.post("/api/jobs", json={"kind": "embed", "model": "all-minilm", "items": [{"input": many}]})
    assert (r.status_code, r.get_json()) == (400, {"error": "line 1: an embed item takes at most 2048 inputs"})


def test_deep_nesting_and_lone_surrogates_are_400s_and_never_stored(client: FlaskClient) -> None:
    deep = b'{"model": "smollm2", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/api/chat", data=deep)
    assert (r.status_code, r.get_json()) == (400, {"error": "the JSON is nested deeper than 64 levels"})
    surrogate = b'{"model": "smollm2", "items": [{"prompt": "x"}], "metadata": {"team": "\\ud800"}}'
    r = client.post("/api/jobs", data=surrogate, content_type="application/json")
    assert r.status_code == 400 and "lone surrogate" in r.get_json()["error"]
    jsonl = b'{"prompt": "x", "metadata": {"note": "\\udfff"}}\n'
    r = client.post(f"/api/jobs?model={MODEL}", data=jsonl, content_type="application/x-ndjson")
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1: invalid string in JSON")
    query = {"model": MODEL, "metadata": '{"a": "\\ud800"}'}  # the JSON escape of a lone surrogate
    r = client.post("/api/jobs", query_string=query, data=b'{"prompt": "x"}\n', content_type="application/x-ndjson")
    assert r.status_code == 400 and r.get_json()["error"].startswith("metadata: invalid string in JSON")
    assert client.get("/api/jobs").status_code == 200  # every listing still renders


def test_a_json_job_body_is_capped_and_points_to_jsonl(settings: Settings) -> None:
    small = create_app(settings.model_copy(update={"max_body": 1000})).test_client()
    body = {"model": MODEL, "items": [{"prompt": "x" * 100} for _ in range(20)]}
    r = small.post("/api/jobs", json=body)
    assert r.status_code == 413 and "upload larger jobs as JSONL" in r.get_json()["error"]
    lines = "".join(json.dumps(item) + "\n" for item in body["items"])  # the same job as JSONL is an upload
    r = small.post(f"/api/jobs?model={MODEL}&kind=nope", data=lines, content_type="application/x-ndjson")
    assert r.get_json()["error"] == "kind must be one of generate, chat, embed, rerank, not 'nope'"  # not refused for size


def test_a_job_has_at_most_max_chunks(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.grouping

    monkeypatch.setattr(jobs.grouping, "MAX_CHUNKS", 3)
    before = len(client.get("/api/jobs?limit=1000").get_json()["jobs"])
    items = [{"prompt": f"p{i}"} for i in range(7)]
    r = client.post("/api/jobs", json={"model": MODEL, "items": items, "chunk_size": 2})
    assert r.status_code == 400
    assert r.get_json()["error"] == "a job may have at most 3 chunks: use a chunk_size above 2 for more than 6 items"
    assert len(client.get("/api/jobs?limit=1000").get_json()["jobs"]) == before  # nothing stored


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/copy", {"source": MODEL, "destination": "mine"}),
        ("DELETE", "/api/delete", {"model": MODEL}),
        ("POST", "/api/pull", {"model": "smollm2"}),
        ("POST", "/api/create", {"model": "mine", "from": MODEL}),
        ("POST", "/api/blobs/sha256:" + "0" * 64, {}),
        ("POST", "/api/generate", {"model": MODEL, "keep_alive": 0}),
        ("POST", "/api/embed", {"model": "all-minilm", "keep_alive": 0}),
        ("POST", "/api/chat", {**CHAT, "keep_alive": 0}),
    ],
)
def test_only_an_admin_key_changes_the_shared_models(
    settings: Settings, method: str, path: str, body: dict[str, Any]
) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    client = create_app(keyed).test_client()
    user, _ = KeyStore(keyed).create(f"user-{path}-{len(body)}")
    r = client.open(path, method=method, json=body, headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403 and "needs an admin key" in r.get_json()["error"]
    assert client.get("/api/tags", headers={"Authorization": f"Bearer {user}"}).status_code == 200


def test_openai_sampling_fields_get_the_same_bounds(client: FlaskClient) -> None:
    for field, value in (("temperature", 1e9), ("top_p", 2), ("max_tokens", -5), ("stop", ["s"] * 20)):
        r = client.post("/v1/chat/completions", json={**CHAT, field: value})
        assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error", (field, r.get_json())
