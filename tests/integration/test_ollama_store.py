"""`OLLAMA_MODELS` pointed at a store written by Ollama serves its models with their template, system, params
and messages layers: the test writes such a store in Ollama's exact layout (blobs named by digest, Ollama's
config blob, a manifest under registry.ollama.ai/library) and runs a stack on it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack
from tests.helpers import CHATML_TEMPLATE as TEMPLATE
from tests.helpers import MODEL, own_stack


def write_ollama_store(root: Path, gguf: bytes) -> None:
    blobs = root / "blobs"
    blobs.mkdir(parents=True)

    def blob(media: str, data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    layers = [
        blob("application/vnd.ollama.image.model", gguf),
        blob("application/vnd.ollama.image.template", TEMPLATE.encode()),
        blob("application/vnd.ollama.image.system", b"You are Tiny, a terse assistant."),
        blob("application/vnd.ollama.image.params", json.dumps({"stop": ["<|im_start|>", "<|im_end|>"],
                                                                "temperature": 0.2}).encode()),
    ]
    config = {"model_format": "gguf", "model_family": "llama", "model_families": ["llama"], "model_type": "134.52M",
              "file_type": "Q4_1", "architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": blob("application/vnd.docker.container.image.v1+json", json.dumps(config).encode()),
                "layers": layers}
    path = root / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def ollama_stack(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("ollama-store")
    write_ollama_store(home / "ollama-models", ModelStore(settings.models_path).get(MODEL).model_path.read_bytes())
    with own_stack(settings, home, 6, models_dir=home / "ollama-models") as stack:
        yield stack


def test_an_ollama_store_lists_and_shows_its_models(ollama_stack: Stack) -> None:
    tags = {m["name"]: m for m in httpx.get(ollama_stack.base_url + "/api/tags").json()["models"]}
    assert tags["tiny:latest"]["details"]["family"] == "llama"
    assert tags["tiny:latest"]["details"]["quantization_level"] == "Q4_1"
    shown = httpx.post(ollama_stack.base_url + "/api/show", json={"model": "tiny"}).json()
    assert shown["template"] == TEMPLATE and shown["system"] == "You are Tiny, a terse assistant."
    assert [line.split()[0] for line in shown["parameters"].splitlines()] == ["stop", "stop", "temperature"]


def test_an_ollama_store_model_chats_with_its_own_layers(ollama_stack: Stack) -> None:
    body = {"messages": [{"role": "user", "content": "Who are you?"}], "stream": False,
            "options": {"num_predict": 8, "temperature": 0}}
    tiny = httpx.post(ollama_stack.base_url + "/api/chat", json={"model": "tiny", **body}, timeout=120).json()
    assert tiny["message"]["role"] == "assistant" and tiny["eval_count"] >= 1
    # Ollama's template with the store's SYSTEM renders the same prompt as the GGUF's own template with it
    system = [{"role": "system", "content": "You are Tiny, a terse assistant."}]
    plain = httpx.post(ollama_stack.base_url + "/api/chat", timeout=120, json={
        "model": MODEL, **body, "messages": system + body["messages"]}).json()
    assert abs(tiny["prompt_eval_count"] - plain["prompt_eval_count"]) <= 1
    assert tiny["message"]["content"].split()[:3] == plain["message"]["content"].split()[:3]
