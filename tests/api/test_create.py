"""``POST /api/blobs/:digest`` and ``POST /api/create`` on the in-process app: layers written in Ollama's manifest
format, shown back by /api/show, and every bad request a 400 that leaves the store as it was."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from corral.modelstore.store import ModelName, ModelStore
from corral.settings import Settings
from tests.helpers import MODEL


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def create(client: FlaskClient, **body: Any) -> Any:
    return client.post("/api/create", json={"stream": False, **body})


def manifests(settings: Settings) -> set[str]:
    root = settings.models_path / "manifests"
    return {str(p.relative_to(root)) for p in root.glob("*/*/*/*")}


def test_blobs_upload_checked_against_their_digest(client: FlaskClient, settings: Settings) -> None:
    data = b"a small blob " * 1000
    digest = digest_of(data)
    assert client.head(f"/api/blobs/{digest}").status_code == 404
    bad = client.post(f"/api/blobs/{digest_of(b'other')}", data=data)
    assert bad.status_code == 400 and "digest mismatch" in bad.get_json()["error"]
    assert not list((settings.models_path / "blobs").glob(".partial-*"))  # nothing left behind
    assert client.post(f"/api/blobs/{digest}", data=data).status_code == 201
    assert client.head(f"/api/blobs/{digest}").status_code == 200
    assert client.post(f"/api/blobs/{digest}", data=data).status_code == 200  # already there
    assert client.post("/api/blobs/sha256:nothex", data=data).get_json() == {"error": "invalid digest format"}


def test_a_model_created_from_another_carries_its_layers(client: FlaskClient) -> None:
    r = create(client, model="house-assistant", **{"from": MODEL}, system="You answer in French.",
               parameters={"temperature": 0.2, "num_predict": 7, "stop": ["<|im_end|>", "###"]},
               messages=[{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"}],
               license="MIT")
    assert (r.status_code, r.get_json()) == (200, {"status": "success"})
    shown = client.post("/api/show", json={"model": "house-assistant"}).get_json()
    assert shown["system"] == "You answer in French." and shown["license"] == "MIT"
    assert shown["messages"] == [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"}]
    assert shown["parameters"].splitlines()[0].split() == ["temperature", "0.2"]
    assert [line.split()[1] for line in shown["parameters"].splitlines() if line.startswith("stop")] == ['"<|im_end|>"', '"###"']
    modelfile = shown["modelfile"]
    assert "\nSYSTEM \"You answer in French.\"\n" in modelfile and "\nPARAMETER num_predict 7\n" in modelfile
    assert "\nMESSAGE assistant \"Salut !\"\n" in modelfile and "\nLICENSE \"MIT\"\n" in modelfile
    base = client.post("/api/show", json={"model": MODEL}).get_json()
    assert shown["details"] == base["details"] and shown["capabilities"] == base["capabilities"]
    tags = {m["name"]: m for m in client.get("/api/tags").get_json()["models"]}
    assert tags["house-assistant:latest"]["details"]["family"] == "llama"


def test_progress_lines_as_ollama_sends_them(client: FlaskClient) -> None:
    r = client.post("/api/create", json={"model": "streamed", "from": MODEL, "system": "Be brief."})
    lines = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "reading model metadata" and statuses[-2:] == ["writing manifest", "success"]
    assert any(s.startswith("using existing layer sha256:") for s in statuses)
    assert any(s.startswith(("creating new layer sha256:", "using existing layer sha256:")) for s in statuses[1:-2])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "../x", "from": MODEL}, "invalid model name"),
        ({"model": "a"}, "neither 'from' or 'files' was specified"),
        ({"model": "a", "files": {"/etc/x.gguf": "sha256:" + "0" * 64}}, "file path must be relative"),
        ({"model": "a", "files": {"../x.gguf": "sha256:" + "0" * 64}}, "file path must be relative"),
        ({"model": "a", "files": {"x.gguf": "sha256:"}}, "invalid digest format"),
        ({"model": "a", "files": {"x.gguf": "sha256:" + "0" * 64}}, "blob sha256:" + "0" * 64 + " not found"),
        ({"model": "a", "from": "nope"}, "model 'nope' not found"),
        ({"model": "a", "from": MODEL, "parameters": {"top_p": 5}}, 'option "top_p" must be between 0 and 1'),
        ({"model": "a", "from": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages must be a list"),
        ({"model": "a", "from": MODEL, "template": "{{ range .Messages }}{{ upper .Content }}{{ end }}"},
         'template: function "upper" not defined'),
        ({"model": "a", "from": MODEL, "template": "{{ if .System }}no end"}, "template: unexpected EOF"),
        ({"model": "a", "from": MODEL, "quantize": "q4_K_M"}, "quantization is only supported for F16 and F32 models"),
        ({"model": "a", "from": "all-minilm", "quantize": "q9"}, "unsupported quantization type q9"),
        ({"model": "a", "from": MODEL, "adapters": {"../a.gguf": "sha256:" + "0" * 64}}, "file path must be relative"),
        ({"model": "a", "from": MODEL, "adapters": {"a.gguf": "sha256:" + "0" * 64}}, "blob sha256:" + "0" * 64),
    ],
)
def test_bad_creates_are_400s_and_write_nothing(
    client: FlaskClient, settings: Settings, body: dict[str, Any], message: str
) -> None:
    before = manifests(settings)
    r = create(client, **body)
    assert r.status_code in (400, 404) and r.get_json()["error"].startswith(message), r.get_json()
    assert manifests(settings) == before


def test_a_blob_that_is_not_a_gguf_is_refused(client: FlaskClient, settings: Settings) -> None:
    data = b"not a model at all"
    client.post(f"/api/blobs/{digest_of(data)}", data=data)
    before = manifests(settings)
    r = create(client, model="notgguf", files={"model.gguf": digest_of(data)})
    assert r.status_code == 400 and "is not a GGUF file" in r.get_json()["error"]
    assert manifests(settings) == before


def test_a_template_layer_is_kept_and_decides_the_tools_capability(client: FlaskClient) -> None:
    template = "{{ range .Tools }}{{ json . }}{{ end }}{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}"
    assert create(client, model="templated", **{"from": MODEL}, template=template).get_json() == {"status": "success"}
    shown = client.post("/api/show", json={"model": "templated"}).get_json()
    assert shown["template"] == template and "tools" in shown["capabilities"]
    assert 'TEMPLATE """{{ range .Tools }}' in shown["modelfile"]
    plain = "{{ .Prompt }}"
    create(client, model="untooled", **{"from": "templated"}, template=plain)
    assert "tools" not in client.post("/api/show", json={"model": "untooled"}).get_json()["capabilities"]


def test_safetensors_of_an_architecture_corral_does_not_convert(client: FlaskClient, settings: Settings) -> None:
    config, weights = b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}', b"not really weights"
    for data in (config, weights):
        client.post(f"/api/blobs/{digest_of(data)}", data=data)
    before = manifests(settings)
    r = create(client, model="llama-st", files={"config.json": digest_of(config), "model.safetensors": digest_of(weights)})
    assert r.status_code == 400 and r.get_json()["error"].startswith(
        "corral converts safetensors of BERT embedding models only, and this is 'llama'"), r.get_json()
    assert manifests(settings) == before
    assert not list(settings.models_path.glob(".convert-*"))


def test_a_manifest_naming_a_missing_blob_is_not_a_model(client: FlaskClient, settings: Settings) -> None:
    store = ModelStore(settings.models_path)
    manifest = store.manifest(MODEL)
    for layer in manifest["layers"]:
        if layer["mediaType"].endswith(".model"):
            layer["digest"] = "sha256:" + "1" * 64  # as if the blob had been deleted by hand
    path = ModelName.parse("broken").manifest_path(settings.models_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    try:
        tags = client.get("/api/tags")
        assert tags.status_code == 200 and "broken:latest" not in [m["name"] for m in tags.get_json()["models"]]
        message = f"model 'broken:latest' is incomplete: its manifest names blob sha256:{'1' * 64}, which is not in the store"
        for route, body in (("/api/show", {"model": "broken"}), ("/api/create", {"model": "b2", "from": "broken"}),
                            ("/api/chat", {"model": "broken", "messages": [{"role": "user", "content": "hi"}]})):
            r = client.post(route, json={"stream": False, **body})
            assert r.status_code == 404 and r.get_json()["error"].startswith(message), (route, r.get_json())
        assert "b2" not in str(manifests(settings))
    finally:
        path.unlink()
