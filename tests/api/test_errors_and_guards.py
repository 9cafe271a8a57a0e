"""Error shapes and statuses from the reference, CORS and the Host check, on the in-process app."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from tests.helpers import MODEL


def error_of(resp) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
    body = resp.get_json()
    assert set(body) == {"error"}
    return resp.status_code, body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/embed", {"input": "x"}, 404, "model '' not found"),
        ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
        ("/api/show", {}, 400, "model is required"),
        ("/api/generate", {"model": MODEL, "prompt": 5}, 400,
         "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"top_k": "many"}}, 400,
         'option "top_k" must be of type integer'),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": "xml"}, 400,
         'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": "10"}, 400,
         'time: missing unit in duration "10"'),
        ("/api/generate", {"model": MODEL, "prompt": "x", "keep_alive": True}, 400, "Unsupported type: 'bool'"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "raw": True, "system": "s"}, 400,
         "raw mode does not support template, system, or context"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "think": True}, 400, '"smollm2" does not support thinking'),
        ("/api/generate", {"model": "../../etc/passwd", "prompt": "x"}, 400, "invalid model name"),
        ("/api/copy", {"source": MODEL, "destination": "../x"}, 400, 'destination "../x" is invalid'),
    ],
)
def test_reference_errors(client: FlaskClient, path: str, body: dict, status: int, message: str) -> None:
    assert error_of(client.post(path, json=body)) == (status, message)


def test_body_errors(client: FlaskClient) -> None:
    assert error_of(client.post("/api/chat", data=b"")) == (400, "missing request body")
    assert error_of(client.post("/api/chat", data=b"xyz")) == (
        400,
        "invalid character 'x' looking for beginning of value",
    )
    assert error_of(client.post("/api/chat", data=b'{"model": "a"')) == (400, "unexpected EOF")
    # JSON null is an empty request, not a decoding error
    assert error_of(client.post("/api/chat", data=b"null")) == (400, "model is required")


def test_routing_errors_are_json(client: FlaskClient) -> None:
    assert error_of(client.get("/api/nothing")) == (404, "404 page not found")
    assert error_of(client.get("/api/show")) == (405, "405 method not allowed")
    assert error_of(client.get("/api/generate")) == (405, "405 method not allowed")


def test_delete_unknown_model(client: FlaskClient) -> None:
    resp = client.delete("/api/delete", json={"model": "nope"})
    assert error_of(resp) == (404, "model 'nope' not found")


def test_cors_allows_ollama_default_origins(client: FlaskClient) -> None:
    resp = client.get("/api/tags", headers={"Origin": "http://localhost:3000"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    pre = client.options(
        "/api/chat",
        headers={"Origin": "app://obsidian.md", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 204
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]


def test_cors_rejects_other_origins_unless_configured(settings, client: FlaskClient) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/api/tags", headers={"Origin": "https://evil.example"})
    assert resp.status_code == 403 and resp.data == b""
    from api import create_app

    extra = create_app(settings.model_copy(update={"origins": ["https://*.example"]})).test_client()
    ok = extra.get("/api/tags", headers={"Origin": "https://app.example"})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_host_header_guard_on_loopback(client: FlaskClient) -> None:
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 403
    assert client.get("/", headers={"Host": "localhost:11434"}).status_code == 200
    assert client.get("/", headers={"Host": "192.168.1.10"}).status_code == 200
