"""``/v1/responses`` at the door, on the in-process app (no worker): bad input is OpenAI's error object with its
status, and stored responses are each key's own.  What a reply looks like is tested against real processes
with the official clients in tests/integration/test_responses.py."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from api import create_app
from corral.settings import Settings
from jobs.keys import KeyStore
from jobs.responses import ResponseStore
from tests.helpers import MODEL


def openai_error(resp: Any) -> tuple[int, dict[str, Any]]:
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return resp.status_code, body["error"]


def stored(settings: Settings, ident: str, owner: str | None, items: int = 3) -> None:
    body = {"id": ident, "object": "response", "status": "completed", "model": MODEL, "output": [],
            "previous_response_id": None}
    inputs = [{"id": f"msg_{i}", "type": "message", "role": "user", "status": "completed",
               "content": [{"type": "input_text", "text": f"turn {i}"}]} for i in range(items)]
    ResponseStore(settings).save(body, inputs, owner=owner)


@pytest.mark.parametrize(
    ("body", "status", "message", "param"),
    [
        ({"input": "hi"}, 400, "model is required", "model"),
        ({"model": MODEL, "input": [{"type": "computer_call", "id": "x"}]}, 400,
         "input[0]: unknown input item type: computer_call", "input"),
        ({"model": MODEL, "input": [{"role": "tool", "content": "x"}]}, 400,
         "input[0].role must be one of ['user', 'assistant', 'system', 'developer']", "input"),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
         "input[0]: invalid content part type: input_audio", "input"),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, 400,
         "input[0]: an input_text part needs a string 'text'", "input"),
        ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, 400,
         "input[0]: input_file is not supported", "input"),
        ({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_1"}]}, 400,
         "input[0]: item_reference is not supported: send the item itself, or chain with previous_response_id", "input"),
        ({"model": MODEL, "input": "hi", "tools": [{"type": "function", "parameters": {}}]}, 400,
         "tools[0] is a function without a 'name'", "tools"),
        ({"model": MODEL, "input": "hi", "conversation": "conv_1"}, 400,
         "conversation is not supported here: chain with previous_response_id", "conversation"),
        ({"model": MODEL, "input": "hi", "temperature": 3}, 400,
         "invalid value for 'temperature': Input should be less than or equal to 2", "temperature"),
        ({"model": MODEL, "input": [{"type": "function_call_output", "call_id": "call_1", "output": "18C"}]}, 400,
         "No tool call found for function call output with call_id call_1.", "input"),
        ({"model": MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"}]}, 400,
         "input[0].arguments is not valid JSON", "input"),
        ({"model": MODEL, "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}, 400,
         "image URLs are not currently supported, please use base64 encoded data instead", None),
        ({"model": MODEL, "input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": [
            {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}, 400,
         "tool_choice names function 'nope', which is not among the request's tools", "tool_choice"),
        ({"model": MODEL, "input": "hi", "tool_choice": "required"}, 400,
         "tool_choice requires a tool call, but the request declares no tools", "tool_choice"),
        ({"model": MODEL, "input": "hi", "text": {"format": {"type": "xml"}}}, 400, "invalid text.format type: xml",
         "text.format"),
        ({"model": MODEL, "input": "hi", "metadata": {f"k{i}": "v" for i in range(17)}}, 400,
         "metadata takes at most 16 pairs, keys of at most 64 characters and values of at most 512", "metadata"),
        ({"model": MODEL, "input": "hi", "reasoning": {"effort": "extreme"}}, 400,
         'invalid reasoning value: "extreme" (must be "minimal", "low", "medium", "high", "xhigh", "ultra", "max", '
         'or "none")', None),
        ({"model": MODEL, "input": "hi", "background": True, "store": False}, 400,
         "background responses must be stored (store: true)", "background"),
        ({"model": MODEL, "input": "hi", "background": True, "stream": True}, 400,
         "a background response is not streamed here: poll GET /v1/responses/{id}", "stream"),
        ({"model": "no-such-model", "input": "hi"}, 404, "model 'no-such-model' not found", None),
    ],
)
def test_bad_requests(client: FlaskClient, body: dict[str, Any], status: int, message: str, param: str | None) -> None:
    got_status, error = openai_error(client.post("/v1/responses", json=body))
    assert (got_status, error["message"], error["param"]) == (status, message, param)
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_unknown_previous_response(client: FlaskClient) -> None:
    status, error = openai_error(client.post("/v1/responses", json={
        "model": MODEL, "input": "and then?", "previous_response_id": "resp_missing"}))
    assert status == 400
    assert error == {"message": "Previous response with id 'resp_missing' not found.", "type": "invalid_request_error",
                     "param": "previous_response_id", "code": "previous_response_not_found"}


def test_unknown_response_routes(client: FlaskClient) -> None:
    for method, path in (("get", "/v1/responses/resp_x"), ("delete", "/v1/responses/resp_x"),
                         ("get", "/v1/responses/resp_x/input_items"), ("post", "/v1/responses/resp_x/cancel")):
        status, error = openai_error(getattr(client, method)(path))
        assert (status, error["message"], error["type"]) == (404, "Response with id 'resp_x' not found.",
                                                              "not_found_error")


def test_stored_responses_are_each_keys_own(settings: Settings) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    keys = KeyStore(keyed)
    alice, alice_row = keys.create("responses-alice")
    bob, _ = keys.create("responses-bob")
    stored(keyed, "resp_alices", alice_row["id"])
    client = create_app(keyed).test_client()
    as_alice, as_bob = ({"Authorization": f"Bearer {k}"} for k in (alice, bob))
    assert client.get("/v1/responses/resp_alices", headers=as_alice).get_json()["id"] == "resp_alices"
    for method, path in (("get", "/v1/responses/resp_alices"), ("get", "/v1/responses/resp_alices/input_items"),
                         ("delete", "/v1/responses/resp_alices")):
        status, error = openai_error(getattr(client, method)(path, headers=as_bob))
        assert (status, error["message"]) == (404, "Response with id 'resp_alices' not found.")
    status, error = openai_error(client.post("/v1/responses", headers=as_bob, json={
        "model": MODEL, "input": "more", "previous_response_id": "resp_alices"}))
    assert (status, error["code"]) == (400, "previous_response_not_found")
    assert client.get("/v1/responses/resp_alices", headers=as_alice).status_code == 200  # bob's tries changed nothing


def test_input_items_pages(client: FlaskClient, settings: Settings) -> None:
    stored(settings, "resp_paged", None, items=5)
    first = client.get("/v1/responses/resp_paged/input_items?limit=2").get_json()
    assert [i["id"] for i in first["data"]] == ["msg_4", "msg_3"] and first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == ("msg_4", "msg_3")
    rest = client.get("/v1/responses/resp_paged/input_items?limit=5&after=msg_3").get_json()
    assert [i["id"] for i in rest["data"]] == ["msg_2", "msg_1", "msg_0"] and rest["has_more"] is False
    status, error = openai_error(client.get("/v1/responses/resp_paged?stream=true"))
    assert (status, error["message"]) == (400, "a stored response is not streamed again here: GET it whole")
    oldest = client.get("/v1/responses/resp_paged/input_items?order=asc&limit=1").get_json()
    assert [i["id"] for i in oldest["data"]] == ["msg_0"]
    for query, param in (("limit=0", "limit"), ("limit=many", "limit"), ("order=up", "order"), ("after=msg_9", "after")):
        status, error = openai_error(client.get(f"/v1/responses/resp_paged/input_items?{query}"))
        assert (status, error["param"]) == (400, param)
    status, error = openai_error(client.post("/v1/responses/resp_paged/cancel"))
    assert (status, error["message"]) == (400, "Cannot cancel a synchronous response.")
    assert client.delete("/v1/responses/resp_paged").get_json() == {
        "id": "resp_paged", "object": "response.deleted", "deleted": True}
    assert client.get("/v1/responses/resp_paged").status_code == 404


def test_expired_responses_are_gone(client: FlaskClient, settings: Settings) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from jobs.db import sessions
    from jobs.models import StoredResponse, utcnow
    from jobs.responses import purge
    from tests.unit.test_stopping import Recorder

    stored(settings, "resp_old", None)
    with sessions(settings)() as session:
        session.execute(update(StoredResponse).where(StoredResponse.id == "resp_old")
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    assert client.get("/v1/responses/resp_old").status_code == 404
    with sessions(settings)() as session:
        assert purge(session, Recorder(session)) >= 1
        session.commit()
        assert session.get(StoredResponse, "resp_old") is None
