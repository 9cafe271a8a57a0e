"""/api/create's llama.cpp work on a real worker (the API never loads llama.cpp): ``quantize`` of an F16 conversion
(all-MiniLM, which corral converts from safetensors to F16), LoRA ``adapters`` that change what the model says,
and files llama.cpp cannot serve refused at create time, with nothing registered."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from corral.modelstore.store import ModelStore
from corral.settings import Settings
from tests.ggufs import lora_adapter, unknown_architecture
from tests.helpers import EMBED_MODEL, MODEL

SENTENCES = ["The cat sat on the mat.", "Quarterly revenue grew by eight percent.", "Photosynthesis needs light."]


def upload(base_url: str, path: Path) -> str:
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.post(f"{base_url}/api/blobs/{digest}", content=data, timeout=60)
    assert r.status_code in (200, 201), r.text
    return digest


def create(base_url: str, **body: Any) -> httpx.Response:
    return httpx.post(base_url + "/api/create", json={"stream": False, **body}, timeout=300)


def names(base_url: str) -> set[str]:
    return {m["name"] for m in httpx.get(base_url + "/api/tags").json()["models"]}


def embeddings(base_url: str, model: str) -> np.ndarray:
    r = httpx.post(base_url + "/api/embed", json={"model": model, "input": SENTENCES}, timeout=120)
    assert r.status_code == 200, r.text
    return np.array(r.json()["embeddings"])


def test_quantizing_an_f16_model_streams_progress_and_keeps_its_embeddings(base_url: str) -> None:
    assert httpx.post(base_url + "/api/show", json={"model": EMBED_MODEL}).json()["details"]["quantization_level"] == "F16"
    with httpx.stream("POST", base_url + "/api/create", timeout=300,
                      json={"model": "minilm-q8", "from": EMBED_MODEL, "quantize": "q8_0"}) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    counted = [line for line in lines if line["status"] == "quantizing F16 model to Q8_0" and "total" in line]
    assert counted and counted[-1]["completed"] == counted[-1]["total"] > 50  # one count per tensor
    assert lines[-2:] == [{"status": "writing manifest"}, {"status": "success"}]
    try:
        shown = httpx.post(base_url + "/api/show", json={"model": "minilm-q8"}).json()
        assert shown["details"]["quantization_level"] == "Q8_0" and "embedding" in shown["capabilities"]
        tags = {m["name"]: m for m in httpx.get(base_url + "/api/tags").json()["models"]}
        assert tags["minilm-q8:latest"]["size"] < 0.65 * tags[f"{EMBED_MODEL}:latest"]["size"]
        r = create(base_url, model="minilm-q4km", **{"from": EMBED_MODEL}, quantize="Q4_K_M")
        assert r.json() == {"status": "success"}, r.text
        f16, q8, q4 = (embeddings(base_url, m) for m in (EMBED_MODEL, "minilm-q8", "minilm-q4km"))
        # The vectors are normalised: rows' dot products are cosine similarities with the F16 model's.
        assert min((f16 * q8).sum(axis=1)) > 0.995
        assert min((f16 * q4).sum(axis=1)) > 0.95
        assert not np.allclose(f16, q8)  # another file, really decoded
    finally:
        for name in ("minilm-q8", "minilm-q4km"):
            httpx.request("DELETE", base_url + "/api/delete", json={"model": name})


def test_an_adapter_changes_what_the_model_says(base_url: str, settings: Settings, tmp_path: Path) -> None:
    base = ModelStore(settings.models_path).get(MODEL).model_path
    digest = upload(base_url, lora_adapter(base, tmp_path / "lora.gguf"))
    r = create(base_url, model="smol-lora", **{"from": MODEL}, adapters={"lora.gguf": digest})
    assert r.json() == {"status": "success"}, r.text
    try:
        shown = httpx.post(base_url + "/api/show", json={"model": "smol-lora"}).json()
        assert f"\nADAPTER {settings.models_path / 'blobs' / digest.replace(':', '-')}\n" in shown["modelfile"]
        body = {"messages": [{"role": "user", "content": "Name three colours."}], "stream": False,
                "options": {"temperature": 0, "num_predict": 12}}
        plain = httpx.post(base_url + "/api/chat", json={"model": MODEL, **body}, timeout=120).json()
        tuned = httpx.post(base_url + "/api/chat", json={"model": "smol-lora", **body}, timeout=120).json()
        assert tuned["message"]["content"] != plain["message"]["content"]
        again = httpx.post(base_url + "/api/chat", json={"model": MODEL, **body}, timeout=120).json()
        assert again["message"]["content"] == plain["message"]["content"]  # the base model is untouched
    finally:
        httpx.request("DELETE", base_url + "/api/delete", json={"model": "smol-lora"})


def test_a_model_created_from_an_uploaded_gguf(base_url: str, settings: Settings) -> None:
    digest = upload(base_url, ModelStore(settings.models_path).get(MODEL).model_path)
    r = create(base_url, model="uploaded:v1", files={"smollm2.gguf": digest}, system="Hello.")
    assert r.json() == {"status": "success"}, r.text
    assert httpx.post(base_url + "/api/show", json={"model": "uploaded:v1"}).json()["details"]["quantization_level"] == "Q4_1"
    r = create(base_url, model="uploaded:v2", **{"from": digest})  # `from` the blob itself, as Ollama takes it
    assert r.json() == {"status": "success"}, r.text
    for name in ("uploaded:v1", "uploaded:v2"):
        httpx.request("DELETE", base_url + "/api/delete", json={"model": name})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown architecture", "llama.cpp cannot load this model: unknown model architecture: 'corralnet'"),
        ("misshapen adapter", "llama.cpp cannot apply the adapter to this model:"),
        ("model as adapter", "model.gguf is not a LoRA adapter in GGUF format"),
        ("quantize a Q4_1", "quantization is only supported for F16 and F32 models"),
        ("unknown quant", "unsupported quantization type q3_X"),
    ],
)
def test_files_llama_cpp_cannot_serve_fail_at_create(
    base_url: str, settings: Settings, tmp_path: Path, case: str, message: str
) -> None:
    base = ModelStore(settings.models_path).get(MODEL).model_path
    body: dict[str, Any] = {"from": MODEL}
    if case == "unknown architecture":
        body = {"files": {"odd.gguf": upload(base_url, unknown_architecture(tmp_path / "odd.gguf"))}}
    elif case == "misshapen adapter":
        body["adapters"] = {"lora.gguf": upload(base_url, lora_adapter(base, tmp_path / "bad.gguf", misshapen=True))}
    elif case == "model as adapter":
        body["adapters"] = {"model.gguf": upload(base_url, base)}
    elif case == "quantize a Q4_1":
        body["quantize"] = "q8_0"
    else:
        body["quantize"] = "q3_X"
    before = names(base_url)
    r = create(base_url, model="refused", **body)
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
    assert names(base_url) == before
