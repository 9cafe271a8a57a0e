"""``POST /api/pull`` over Ollama's registry protocol, from a registry this test serves on 127.0.0.1 (manifests
and blobs in the registry's URL layout, with Range support): progress lines, resuming an interrupted download,
digest checks, and nothing registered unless the whole model arrived."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask.testing import FlaskClient

from corral.registry import blob_url, manifest_url
from corral.settings import Settings
from corral.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MODEL_MEDIA_TYPE, ModelName, ModelStore
from tests.helpers import MODEL


class Registry:
    """Serves ``/v2/<namespace>/<model>/manifests/<tag>`` and ``.../blobs/<digest>``; can cut a blob short once."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # digest -> bytes sent before the connection drops (once)
        self.ranges: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = self.path.split("/")
                if len(parts) == 6 and parts[4] == "manifests":
                    body = registry.manifests.get("/".join(parts[2:4]) + ":" + parts[5])
                    return self._send(200, body) if body else self._send(404, b'{"errors":[]}')
                if len(parts) == 6 and parts[4] == "blobs" and parts[5] in registry.blobs:
                    data, start = registry.blobs[parts[5]], 0
                    if "Range" in self.headers:
                        registry.ranges.append(self.headers["Range"])
                        start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206 if start else 200)
                    self.send_header("Content-Length", str(len(data) - start))
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.end_headers()
                    cut = registry.cut_after.pop(parts[5], None)
                    self.wfile.write(data[start:cut] if cut else data[start:])
                    if cut:
                        self.close_connection = True
                    return None
                return self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_port}"

    def publish(self, name: str, model: bytes, **layers: bytes) -> dict[str, Any]:
        """Serve ``name`` (namespace/model:tag) with a model layer and text layers (system=..., params=...)."""
        def ref(media: str, data: bytes) -> dict[str, Any]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.blobs[digest] = data
            return {"mediaType": media, "digest": digest, "size": len(data)}

        manifest = {
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": ref(CONFIG_MEDIA_TYPE, json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()),
            "layers": [ref(MODEL_MEDIA_TYPE, model)]
            + [ref(f"application/vnd.ollama.image.{kind}", data) for kind, data in layers.items()],
        }
        self.manifests[name] = json.dumps(manifest).encode()
        return manifest


@pytest.fixture()
def registry() -> Iterator[Registry]:
    served = Registry()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


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


def test_a_model_pulls_with_ollamas_progress_and_its_layers(client: FlaskClient, registry: Registry, gguf: bytes) -> None:
    gguf = variant(gguf, 1)
    manifest = registry.publish("library/tiny:latest", gguf, system=b"You are tiny.", params=b'{"temperature": 0.1}')
    lines = pull(client, f"{registry.host}/library/tiny")
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    model = manifest["layers"][0]
    last = [line for line in lines if line.get("digest") == model["digest"]][-1]
    assert last == {"status": f"pulling {model['digest'][7:19]}", "digest": model["digest"], "total": len(gguf),
                    "completed": len(gguf)}
    shown = client.post("/api/show", json={"model": f"{registry.host}/library/tiny"}).get_json()
    assert shown["system"] == "You are tiny." and shown["parameters"].split() == ["temperature", "0.1"]
    assert shown["details"]["quantization_level"] == "Q4_1" and "completion" in shown["capabilities"]
    names = [m["name"] for m in client.get("/api/tags").get_json()["models"]]
    assert f"{registry.host}/library/tiny:latest" in names


def test_an_interrupted_pull_registers_nothing_and_resumes_where_it_stopped(
    client: FlaskClient, registry: Registry, gguf: bytes, settings: Settings
) -> None:
    manifest = registry.publish("library/resumed:v1", variant(gguf, 2))
    digest = manifest["layers"][0]["digest"]
    registry.cut_after[digest] = 3 << 20  # the connection drops after 3 MiB
    name = f"{registry.host}/library/resumed:v1"
    first = pull(client, name)
    assert "error" in first[-1] and first[-1].get("status") != "success"
    assert client.post("/api/show", json={"model": name}).status_code == 404  # no model without all of it
    partial = ModelStore(settings.models_path).blob_path(digest).with_name(f"sha256-{digest[7:]}-partial")
    assert partial.stat().st_size == 3 << 20
    second = pull(client, name)
    assert second[-1] == {"status": "success"}
    assert registry.ranges == [f"bytes={3 << 20}-"]  # only the rest was fetched
    assert not partial.exists() and client.post("/api/show", json={"model": name}).status_code == 200


def test_a_corrupt_blob_is_refused_and_not_kept(client: FlaskClient, registry: Registry, gguf: bytes, settings: Settings) -> None:
    manifest = registry.publish("library/corrupt:latest", variant(gguf, 3))
    digest = manifest["layers"][0]["digest"]
    registry.blobs[digest] = variant(gguf, 4)  # what arrives is not what the manifest says
    lines = pull(client, f"{registry.host}/library/corrupt")
    assert "digest mismatch" in lines[-1]["error"]
    store = ModelStore(settings.models_path)
    assert not store.blob_path(digest).exists() and not store.blob_path(digest).with_name(f"sha256-{digest[7:]}-partial").exists()
    assert client.post("/api/show", json={"model": f"{registry.host}/library/corrupt"}).status_code == 404


def test_an_unknown_model_says_what_ollama_says(client: FlaskClient, registry: Registry) -> None:
    lines = pull(client, f"{registry.host}/library/nothing:here")
    assert lines == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    r = client.post("/api/pull", json={"model": f"{registry.host}/library/nothing", "insecure": True, "stream": False})
    assert (r.status_code, r.get_json()) == (500, {"error": "pull model manifest: file does not exist"})


def test_registry_urls_for_ollama_names_and_hugging_face() -> None:
    assert manifest_url(ModelName.parse("llama3.2"), insecure=False) == \
        "https://registry.ollama.ai/v2/library/llama3.2/manifests/latest"
    hf = ModelName.parse("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M")
    assert manifest_url(hf, insecure=False) == "https://hf.co/v2/bartowski/llama-3.2-1b-instruct-gguf/manifests/q4_k_m"
    assert blob_url(hf, "sha256:ab", insecure=True) == "http://hf.co/v2/bartowski/llama-3.2-1b-instruct-gguf/blobs/sha256:ab"
