"""``POST /api/pull`` over Ollama's registry protocol, from a registry this test serves on 127.0.0.1 (manifests
and blobs in the registry's URL layout, with Range support): progress lines, resuming an interrupted download,
digest checks, and nothing registered unless the whole model arrived."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from corral.modelstore.registry import blob_url, manifest_url
from corral.modelstore.store import ModelName, ModelStore
from corral.settings import Settings
from tests.helpers import MODEL, Registry


@pytest.fixture(scope="module")
def gguf(models_dir: Any) -> bytes:
    return ModelStore(models_dir).get(MODEL).model_path.read_bytes()


def variant(gguf: bytes, n: int) -> bytes:
    """Another file than the store's own SmolLM2 (its last weight byte differs), so the pull downloads it."""
    return gguf[:-1] + bytes([gguf[-1] ^ n])


def pull(client: FlaskClient, name: str) -> list[dict[str, Any]]:
    r = client.post("/api/pull", json={"model": name, "insecure": True})
    assert r.status_code == 200, r.get_data(as_text=True)
    return [json.loads(line) for line in r.get_data(as_text=True).splitlines()]


def test_a_model_pulls_with_ollamas_progress_and_its_layers(client: FlaskClient, local_registry: Registry, gguf: bytes) -> None:
    gguf = variant(gguf, 1)
    manifest = local_registry.publish("library/tiny:latest", gguf, system=b"You are tiny.", params=b'{"temperature": 0.1}')
    lines = pull(client, f"{local_registry.host}/library/tiny")
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    model = manifest["layers"][0]
    last = [line for line in lines if line.get("digest") == model["digest"]][-1]
    assert last == {"status": f"pulling {model['digest'][7:19]}", "digest": model["digest"], "total": len(gguf),
                    "completed": len(gguf)}
    shown = client.post("/api/show", json={"model": f"{local_registry.host}/library/tiny"}).get_json()
    assert shown["system"] == "You are tiny." and shown["parameters"].split() == ["temperature", "0.1"]
    assert shown["details"]["quantization_level"] == "Q4_1" and "completion" in shown["capabilities"]
    names = [m["name"] for m in client.get("/api/tags").get_json()["models"]]
    assert f"{local_registry.host}/library/tiny:latest" in names


def test_an_interrupted_pull_registers_nothing_and_resumes_where_it_stopped(
    client: FlaskClient, local_registry: Registry, gguf: bytes, settings: Settings
) -> None:
    manifest = local_registry.publish("library/resumed:v1", variant(gguf, 2))
    digest = manifest["layers"][0]["digest"]
    local_registry.cut_after[digest] = 3 << 20  # the connection drops after 3 MiB
    name = f"{local_registry.host}/library/resumed:v1"
    first = pull(client, name)
    assert "error" in first[-1] and first[-1].get("status") != "success"
    assert client.post("/api/show", json={"model": name}).status_code == 404  # no model without all of it
    partial = ModelStore(settings.models_path).blob_path(digest).with_name(f"sha256-{digest[7:]}-partial")
    assert partial.stat().st_size == 3 << 20
    second = pull(client, name)
    assert second[-1] == {"status": "success"}
    assert local_registry.ranges == [f"bytes={3 << 20}-"]  # only the rest was fetched
    assert not partial.exists() and client.post("/api/show", json={"model": name}).status_code == 200


def test_a_disk_that_fills_mid_pull_is_an_error_and_the_next_pull_completes(
    client: FlaskClient, local_registry: Registry, gguf: bytes, settings: Settings
) -> None:
    manifest = local_registry.publish("library/full:latest", variant(gguf, 5))
    digest = manifest["layers"][0]["digest"]
    store = ModelStore(settings.models_path)
    partial = store.blob_path(digest).with_name(f"sha256-{digest[7:]}-partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.symlink_to("/dev/full")  # every write to the download fails as on a full disk (ENOSPC)
    name = f"{local_registry.host}/library/full"
    before = sorted(p.name for p in (settings.models_path / "blobs").iterdir())
    lines = pull(client, name)
    assert lines[-1] == {"error": "pull failed: No space left on device"}
    assert client.post("/api/show", json={"model": name}).status_code == 404  # nothing registered
    assert sorted(p.name for p in (settings.models_path / "blobs").iterdir()) == before  # nothing else written
    assert client.post("/api/show", json={"model": MODEL}).status_code == 200  # the store is still whole
    partial.unlink()  # space again
    assert pull(client, name)[-1] == {"status": "success"}
    assert client.post("/api/show", json={"model": name}).status_code == 200


def test_a_manifest_naming_a_blob_the_registry_lacks_registers_nothing(
    client: FlaskClient, local_registry: Registry, gguf: bytes, settings: Settings
) -> None:
    manifest = local_registry.publish("library/holey:latest", variant(gguf, 6), system=b"Holey.")
    system = manifest["layers"][-1]["digest"]
    del local_registry.blobs[system]
    lines = pull(client, f"{local_registry.host}/library/holey")
    assert lines[-1] == {"error": f"pull {system}: 404"}
    assert client.post("/api/show", json={"model": f"{local_registry.host}/library/holey"}).status_code == 404


def test_a_corrupt_blob_is_refused_and_not_kept(
    client: FlaskClient, local_registry: Registry, gguf: bytes, settings: Settings
) -> None:
    manifest = local_registry.publish("library/corrupt:latest", variant(gguf, 3))
    digest = manifest["layers"][0]["digest"]
    local_registry.blobs[digest] = variant(gguf, 4)  # what arrives is not what the manifest says
    lines = pull(client, f"{local_registry.host}/library/corrupt")
    assert "digest mismatch" in lines[-1]["error"]
    store = ModelStore(settings.models_path)
    assert not store.blob_path(digest).exists() and not store.blob_path(digest).with_name(f"sha256-{digest[7:]}-partial").exists()
    assert client.post("/api/show", json={"model": f"{local_registry.host}/library/corrupt"}).status_code == 404


def test_an_unknown_model_says_what_ollama_says(client: FlaskClient, local_registry: Registry) -> None:
    lines = pull(client, f"{local_registry.host}/library/nothing:here")
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    r = client.post("/api/pull", json={"model": f"{local_registry.host}/library/nothing", "insecure": True, "stream": False})
    assert (r.status_code, r.get_json()) == (500, {"error": "pull model manifest: file does not exist"})


def test_registry_urls_for_ollama_names_and_hugging_face() -> None:
    assert manifest_url(ModelName.parse("llama3.2"), insecure=False) == \
        "https://registry.ollama.ai/v2/library/llama3.2/manifests/latest"
    hf = ModelName.parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert manifest_url(hf, insecure=False) == "https://hf.co/v2/bartowski/llama-3.2-1b-instruct-gguf/manifests/q4_k_m"
    assert blob_url(hf, "sha256:ab", insecure=True) == "http://hf.co/v2/bartowski/llama-3.2-1b-instruct-gguf/blobs/sha256:ab"


def test_a_host_outside_corral_pull_hosts_is_a_403_before_anything_is_sent(client: FlaskClient) -> None:
    r = client.post("/api/pull", json={"model": "llama3.2:1b", "stream": False})
    assert (r.status_code, r.get_json()) == (
        403, {"error": "pulling from registry.ollama.ai is not allowed on this server (CORRAL_PULL_HOSTS)"})
    r = client.post("/api/pull", json={"model": "hf.co/someone/model:Q4_K_M"})
    assert r.status_code == 403 and "hf.co" in r.get_json()["error"]


def test_a_vision_model_pulls_with_its_projector(client: FlaskClient, local_registry: Registry, gguf: bytes,
                                                 tmp_path: Path) -> None:
    """A manifest with an ``application/vnd.ollama.image.projector`` layer (as Ollama's library vision models
    have): the projector comes along and the model has ``vision``."""
    from tests.ggufs import vision_projector

    projector = vision_projector(tmp_path / "mmproj.gguf").read_bytes()
    local_registry.publish("library/seeing:latest", gguf, projector=projector)
    assert pull(client, f"{local_registry.host}/library/seeing")[-1] == {"status": "success"}
    shown = client.post("/api/show", json={"model": f"{local_registry.host}/library/seeing"}).get_json()
    assert "vision" in shown["capabilities"] and shown["projector_info"]["general.architecture"] == "clip"


def test_a_pull_goes_through_the_proxy_the_environment_names(
    client: FlaskClient, local_registry: Registry, gguf: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY mean what they mean in Ollama: the registry's requests go to the proxy (here the test registry
    answers as one), so a registry that only the proxy can reach (nothing listens on localhost:9) still pulls."""
    local_registry.publish("library/behind-proxy:latest", variant(gguf, 7))
    monkeypatch.setenv("HTTP_PROXY", f"http://{local_registry.host}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    lines = pull(client, "localhost:9/library/behind-proxy")
    assert lines[-1] == {"status": "success"}
    assert local_registry.proxied[0] == "http://localhost:9/v2/library/behind-proxy/manifests/latest"


def test_a_pulled_cross_encoder_is_a_reranker(client: FlaskClient, local_registry: Registry, tmp_path: Path) -> None:
    """A reranker GGUF pulled like any model: the rerank capability in /api/show and /api/tags, and no other."""
    from tests.ggufs import cross_encoder

    local_registry.publish("library/tiny-rerank:latest", cross_encoder(tmp_path / "ce.gguf").read_bytes())
    name = f"{local_registry.host}/library/tiny-rerank"
    assert pull(client, name)[-1] == {"status": "success"}
    assert client.post("/api/show", json={"model": name}).get_json()["capabilities"] == ["rerank"]
    tags = {m["name"]: m for m in client.get("/api/tags").get_json()["models"]}
    assert tags[f"{name}:latest"]["capabilities"] == ["rerank"]
    generate = client.post("/api/generate", json={"model": name, "prompt": "hi"})
    assert generate.status_code == 400  # a reranker does not generate
