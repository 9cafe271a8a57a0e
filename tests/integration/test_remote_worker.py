"""Workers on other machines: blobs served by digest, pulled with a sha256 check, and a worker that starts
with an empty model store and `--pull-from` the API, then keeps up with the models created there."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import pytest

from corral.errors import BadRequest
from corral.modelstore.remote import pull_from_server
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack, fresh_database
from tests.ggufs import lora_adapter
from tests.helpers import MODEL, clean_redis, make_settings, with_db

MINILM = "all-minilm"


def test_blobs_by_digest_and_manifests(base_url: str, settings: Settings) -> None:
    record = ModelStore(settings.models_path).get(MINILM)
    digest = f"sha256:{record.model_digest}"
    assert httpx.head(f"{base_url}/api/blobs/{digest}").status_code == 200
    assert httpx.head(f"{base_url}/api/blobs/sha256:{'0' * 64}").status_code == 404
    r = httpx.get(f"{base_url}/api/blobs/sha256:{'0' * 64}")
    assert r.status_code == 404 and r.json() == {"error": "blob not found"}
    assert httpx.get(f"{base_url}/api/blobs/not-a-digest").status_code == 400
    blob = httpx.get(f"{base_url}/api/blobs/{digest}", timeout=60)
    assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == record.model_digest
    manifest = httpx.get(f"{base_url}/api/manifests/{MINILM}").json()
    assert manifest["layers"][0]["digest"] == digest
    assert httpx.get(f"{base_url}/api/manifests/nope").status_code == 404


def test_pull_from_server_copies_once(base_url: str, settings: Settings, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    fetched: list[str] = []
    assert pull_from_server(store, base_url, [MINILM], progress=fetched.append) == [MINILM]
    assert len(fetched) == 2  # the config blob and the GGUF
    here, there = store.get(MINILM), ModelStore(settings.models_path).get(MINILM)
    assert here.model_digest == there.model_digest and here.digest == there.digest
    assert not store.blob_path(here.model_digest).is_symlink()
    fetched.clear()
    pull_from_server(store, base_url, [MINILM], progress=fetched.append)
    assert fetched == []  # nothing fetched twice


def test_a_corrupted_blob_is_refused(settings: Settings, tmp_path: Path) -> None:
    from api import create_app

    source = ModelStore(tmp_path / "source")
    gguf = ModelStore(settings.models_path).get(MINILM).model_path.resolve()
    record = source.register_gguf(["tiny"], gguf)[0]
    blob = source.blob_path(record.model_digest)
    with open(blob, "r+b") as fh:  # flip bytes in the middle: the digest no longer matches
        fh.seek(1 << 20)
        fh.write(b"\x00corrupt\x00")
    app = create_app(settings.model_copy(update={"models_dir": source.root}))
    target = ModelStore(tmp_path / "target")
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://localhost") as client:
        with pytest.raises(BadRequest, match="digest mismatch"):
            pull_from_server(target, "http://localhost", ["tiny"], client=client)
    assert not target.has_blob(record.model_digest) and target.list() == []
    assert not any((tmp_path / "target" / "blobs").glob(".partial-*"))


@pytest.mark.slow
def test_a_remote_worker_copies_models_created_after_it_started(
    base_url: str, settings: Settings, tmp_path: Path
) -> None:
    """An API with the model store, and a worker elsewhere that starts with an empty store (`--pull-from`, no
    `--models`): it copies the API's models and serves them; a model created later from one it serves (with a
    LoRA adapter layer) is copied when first asked for, and one with new weights (quantized) by its sync."""
    url = with_db(settings.redis, 3)
    clean_redis(url)
    remote = make_settings(tmp_path / "home", url, tmp_path / "remote-models", database_url=f"sqlite:///{tmp_path / 'r.db'}")
    fresh_database(remote)
    front = Stack(remote.model_copy(update={"models_dir": settings.models_path}), tmp_path / "front-logs")
    worker = Stack(remote, tmp_path / "logs")
    lora = upload_file(base_url, lora_adapter(ModelStore(settings.models_path).get(MODEL).model_path, tmp_path / "lora.gguf"))
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "stream": False,
            "options": {"temperature": 0, "num_predict": 12}}
    try:
        proc = worker.start_worker("--pull-from", base_url, timeout=120)
        assert "models from" in proc.output()
        assert ModelStore(remote.models_path).get(MODEL).model_digest == ModelStore(settings.models_path).get(MODEL).model_digest
        front.start_api()
        plain = httpx.post(front.base_url + "/api/chat", json={"model": MODEL, **body}, timeout=120).json()
        assert plain["eval_count"] > 0  # served by the remote worker: the only one on this Redis database
        # Created through the session's API, whose worker does the llama.cpp checks; served here by the remote one.
        for created in ({"model": "remote-lora", "from": MODEL, "adapters": {"lora.gguf": lora}},
                        {"model": "remote-q8", "from": MINILM, "quantize": "q8_0"}):
            r = httpx.post(base_url + "/api/create", json={"stream": False, **created}, timeout=300)
            assert r.json() == {"status": "success"}, r.text
        tuned = httpx.post(front.base_url + "/api/chat", json={"model": "remote-lora", **body}, timeout=120).json()
        assert tuned["message"]["content"] != plain["message"]["content"]  # the adapter came along
        remote_store = ModelStore(remote.models_path)
        assert remote_store.get("remote-lora").adapter_paths[0].is_file()
        embedded = httpx.post(front.base_url + "/api/embed", json={"model": "remote-q8", "input": ["hello"]},
                              timeout=120)  # a new digest: waits in its queue until the sync has copied it
        assert embedded.status_code == 200, embedded.text
        assert remote_store.get("remote-q8").config["file_type"] == "Q8_0"
    finally:
        front.stop()
        worker.stop()
        for name in ("remote-lora", "remote-q8"):
            httpx.request("DELETE", base_url + "/api/delete", json={"model": name})
        clean_redis(url)
        shutil.rmtree(tmp_path / "remote-models", ignore_errors=True)


def upload_file(base_url: str, path: Path) -> str:
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{base_url}/api/blobs/{digest}", content=data, timeout=60).status_code in (200, 201)
    return digest
