"""Model facts from the store (root, version, tags, show), on the in-process app: no worker is involved."""

from __future__ import annotations

from flask.testing import FlaskClient

from corral.settings import Settings
from tests.helpers import MODEL


def test_root_and_version(client: FlaskClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.text == "Ollama is running"
    assert r.headers["content-type"].startswith("text/plain")
    assert client.head("/").status_code == 200
    v = client.get("/api/version").get_json()
    assert set(v) == {"version"} and v["version"].count(".") == 2


def test_tags_lists_default_model_with_gguf_facts(client: FlaskClient) -> None:
    models = client.get("/api/tags").get_json()["models"]
    by_name = {m["name"]: m for m in models}
    assert {"smollm2:135m", "smollm2:latest"} <= set(by_name)
    m = by_name["smollm2:135m"]
    assert m["model"] == "smollm2:135m"
    assert len(m["digest"]) == 64 and m["size"] > 90_000_000
    assert m["details"]["family"] == "llama"
    assert m["details"]["format"] == "gguf"
    assert m["details"]["quantization_level"] == "Q4_1"
    assert m["details"]["parameter_size"].endswith("M")
    assert m["modified_at"][:4].isdigit()


def test_show_has_model_info(client: FlaskClient) -> None:
    body = client.post("/api/show", json={"model": MODEL}).get_json()
    assert body["model_info"]["general.architecture"] == "llama"
    assert body["model_info"]["tokenizer.ggml.tokens"] == []  # arrays elided unless verbose
    assert "completion" in body["capabilities"]
    assert body["details"]["quantization_level"] == "Q4_1"
    assert "im_start" in body["template"]
    r = client.post("/api/show", json={"model": "nope"})
    assert r.status_code == 404 and r.get_json() == {"error": "model 'nope:latest' not found"}


def test_tags_carry_capabilities_and_images_are_refused_never_dropped(client: FlaskClient) -> None:
    by_name = {m["name"]: m for m in client.get("/api/tags").get_json()["models"]}
    assert by_name["smollm2:latest"]["capabilities"] == ["completion", "tools"]  # Ollama's library TEMPLATE reads .Tools
    assert by_name["all-minilm:latest"]["capabilities"] == ["embedding"]
    refused = f"{MODEL}:latest does not support vision: the request has images"
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "What is in the picture?", "images": ["iVBORw0KGgo="]})
    assert (r.status_code, r.get_json()) == (400, {"error": refused})
    r = client.post("/api/chat", json={"model": MODEL, "messages": [
        {"role": "user", "content": "And this one?", "images": ["iVBORw0KGgo="]}]})
    assert (r.status_code, r.get_json()) == (400, {"error": refused})
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]})
    assert r.status_code == 400 and r.get_json()["error"]["message"] == refused
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})
    assert r.status_code == 400 and r.get_json()["error"]["message"] == (
        "image URLs are not currently supported, please use base64 encoded data instead")


def test_read_only_refuses_model_changes_and_serves_the_rest(settings: Settings) -> None:
    from api import create_app

    client = create_app(settings.model_copy(update={"read_only": True})).test_client()
    for method, path, body, what in (
        ("POST", "/api/create", {"model": "x", "from": MODEL}, "creating a model"),
        ("POST", "/api/pull", {"model": "x"}, "pulling a model"),
        ("POST", "/api/copy", {"source": MODEL, "destination": "y"}, "copying a model"),
        ("DELETE", "/api/delete", {"model": MODEL}, "deleting a model"),
        ("POST", "/api/blobs/sha256:" + "0" * 64, None, "uploading a model file"),
    ):
        r = client.open(path, method=method, json=body)
        assert (r.status_code, r.get_json()) == (
            403, {"error": f"{what} is refused: this server is read-only (CORRAL_READ_ONLY)"}), path
    assert client.get("/api/tags").status_code == 200
    assert client.post("/api/show", json={"model": MODEL}).status_code == 200
