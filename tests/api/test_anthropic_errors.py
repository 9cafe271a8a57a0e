"""Anthropic's routes refuse bad input at the door, in Anthropic's error shape and status, never a 500: the
in-process app, no worker (a request that got as far as queueing work would fail loudly here)."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic.types import ErrorResponse, ModelInfo
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from flask.testing import FlaskClient

from api import create_app
from corral.settings import Settings
from jobs.keys import KeyStore
from tests.helpers import MODEL

ASK = [{"role": "user", "content": "Hi"}]


def _error(client: FlaskClient, path: str, body: Any, status: int = 400, kind: str = "invalid_request_error") -> str:
    r = client.post(path, json=body)
    assert r.status_code == status, r.get_data(as_text=True)
    err = ErrorResponse.model_validate(r.get_json())  # the SDK's own type for an error body
    assert err.type == "error" and err.error.type == kind, r.get_json()
    assert r.get_json()["request_id"].startswith("req_")
    return err.error.message


@pytest.mark.parametrize(("body", "words"), [
    ({"model": MODEL, "messages": ASK}, "max_tokens: Field required"),
    ({"model": MODEL, "max_tokens": 0, "messages": ASK}, "max_tokens: Input should be greater than or equal to 1"),
    ({"max_tokens": 8, "messages": ASK}, "model: Field required"),
    ({"model": MODEL, "max_tokens": 8}, "messages: Field required"),
    ({"model": MODEL, "max_tokens": 8, "messages": []}, "at least one message"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
     "messages.0.content.0: Input tag 'video' found using 'type' does not match"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]},
     "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]},
     "Only base64 images are supported"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}]}]},
     "not base64"),
    ({"model": MODEL, "max_tokens": 8, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "temperature": 3}, "temperature"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "tool_choice": {"type": "tool"}}, "tool_choice.tool.name"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "tool_choice": {"type": "any"}}, "declares no tools"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "thinking": {"type": "sometimes"}}, "thinking"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "tools": [{"name": "x"}]}, "tools.0.input_schema"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "stop_sequences": ["s"] * 17}, "stop"),
    ({"model": MODEL, "max_tokens": 8, "messages": ASK, "output_config": {"format": {"type": "yaml"}}},
     "output_config.format"),
    ([1, 2], "JSON object"),
])
def test_bad_messages_bodies_are_400s_in_anthropic_shape(client: FlaskClient, body: Any, words: str) -> None:
    assert words in _error(client, "/v1/messages", body)


def test_the_same_checks_guard_count_tokens(client: FlaskClient) -> None:
    assert "video" in _error(client, "/v1/messages/count_tokens", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "video"}]}]})


def test_not_found_and_routing_errors_are_anthropic_shaped(client: FlaskClient) -> None:
    body = {"model": "no-such-model", "max_tokens": 8, "messages": ASK}
    assert "not found" in _error(client, "/v1/messages", body, 404, "not_found_error")
    r = client.get("/v1/messages")
    assert r.status_code == 405 and ErrorResponse.model_validate(r.get_json()).error.type == "invalid_request_error"
    r = client.post("/v1/messages", data=b"{not json", content_type="application/json")
    assert r.status_code == 400 and r.get_json()["type"] == "error"
    r = client.get("/v1/messages/batches/msgbatch_nope")
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found_error"
    # /v1/models answers an Anthropic client (anthropic-version) in its shape, errors included
    r = client.get("/v1/models/no-such-model", headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found_error"
    r = client.get("/v1/models/no-such-model")
    assert r.status_code == 404 and "param" in r.get_json()["error"]  # OpenAI's, for everyone else


@pytest.mark.parametrize(("body", "words"), [
    ({}, "requests: Field required"),
    ({"requests": []}, "requests: List should have at least 1 item"),
    ({"requests": [{"custom_id": "has space", "params": {}}]}, "requests.0.custom_id"),
    ({"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]}, "unique"),
    ({"requests": [{"custom_id": "a"}]}, "requests.0.params: Field required"),
])
def test_bad_batches_are_400s(client: FlaskClient, body: Any, words: str) -> None:
    assert words in _error(client, "/v1/messages/batches", body)


def test_batch_list_bounds(client: FlaskClient) -> None:
    r = client.get("/v1/messages/batches?limit=0")
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/messages/batches?after_id=msgbatch_gone")
    assert r.status_code == 404 and r.get_json()["type"] == "error"


def test_models_in_anthropic_shape_page_by_id(client: FlaskClient) -> None:
    headers = {"anthropic-version": "2023-06-01"}
    page = client.get("/v1/models?limit=2", headers=headers).get_json()
    assert set(page) == {"data", "has_more", "first_id", "last_id"} and page["has_more"]
    assert [ModelInfo.model_validate(m).type for m in page["data"]] == ["model", "model"]
    assert page["last_id"] == page["data"][1]["id"]
    rest = client.get(f"/v1/models?after_id={page['last_id']}&limit=1000", headers=headers).get_json()
    back = client.get(f"/v1/models?before_id={rest['first_id']}&limit=1", headers=headers).get_json()
    assert back["data"][0]["id"] == page["last_id"]
    ids = [m["id"] for m in page["data"] + rest["data"]]
    assert len(ids) == len(set(ids)) and "smollm2:135m" in ids and not rest["has_more"]
    assert client.get("/v1/models", headers={"anthropic-version": "x"}).get_json()["data"][0]["created_at"].endswith("Z")
    assert client.get("/v1/models").get_json()["object"] == "list"  # OpenAI's shape without the header


def test_x_api_key_carries_the_key_as_bearer_does(settings: Settings) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    client = create_app(keyed).test_client()
    key = KeyStore(keyed).create("anthropic")[0]
    headers = {"anthropic-version": "2023-06-01"}
    assert client.get("/v1/models", headers={**headers, "x-api-key": key}).status_code == 200
    assert client.get("/v1/models", headers={**headers, "Authorization": f"Bearer {key}"}).status_code == 200
    # Claude Code with ANTHROPIC_AUTH_TOKEN set to anything and the key in x-api-key: either valid one lets it in
    assert client.get("/v1/models", headers={"Authorization": "Bearer ollama", "x-api-key": key}).status_code == 200
    r = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 8, "messages": ASK},
                    headers={"x-api-key": "corral-wrong"})
    assert r.status_code == 401 and r.get_json()["error"] == {"type": "authentication_error",
                                                           "message": "invalid API key"}


def test_a_batch_of_only_invalid_requests_ends_at_once_with_each_errored(client: FlaskClient) -> None:
    """Nothing to run (so no worker needed): the batch ends at creation; paging, retrieval and results work."""
    bad = {"model": MODEL, "max_tokens": 0, "messages": ASK}
    made = []
    for n in range(3):
        r = client.post("/v1/messages/batches", json={"requests": [
            {"custom_id": f"a-{n}", "params": bad}, {"custom_id": f"b-{n}", "params": {**bad, "max_tokens": 8, "stream": True}}]})
        assert r.status_code == 200, r.get_json()
        batch = MessageBatch.model_validate(r.get_json())
        assert batch.processing_status == "ended" and batch.request_counts.errored == 2
        assert batch.results_url == f"http://localhost/v1/messages/batches/{batch.id}/results"
        made.append(batch.id)
    first = client.get("/v1/messages/batches?limit=2").get_json()
    assert [b["id"] for b in first["data"]][:2] == made[::-1][:2] and first["has_more"]
    after = client.get(f"/v1/messages/batches?limit=1&after_id={first['last_id']}").get_json()
    assert after["data"][0]["id"] == made[0]
    before = client.get(f"/v1/messages/batches?limit=1&before_id={made[0]}").get_json()
    assert before["data"][0]["id"] == made[1]
    assert client.get(f"/v1/messages/batches/{made[0]}").get_json()["id"] == made[0]
    lines = client.get(f"/v1/messages/batches/{made[0]}/results").get_data(as_text=True).splitlines()
    results = [MessageBatchIndividualResponse.model_validate_json(line) for line in lines]
    assert [r.custom_id for r in results] == ["a-0", "b-0"] and {r.result.type for r in results} == {"errored"}
    assert "stream" in results[1].result.error.error.message  # type: ignore[union-attr]
