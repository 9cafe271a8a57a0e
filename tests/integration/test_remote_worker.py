"""Workers on other machines: blobs served by digest, pulled with a sha256 check, and a worker that starts
with an empty model store and `--pull-from` the API."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import httpx
import pytest

from corral.errors import BadRequest
from corral.remote import pull_from_server
from corral.settings import Settings
from corral.store import ModelStore
from tests.helpers import MODEL, Stack, clean_redis, fresh_database, make_settings, with_db

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
def test_worker_with_an_empty_store_pulls_from_the_api_and_serves(
    base_url: str, settings: Settings, tmp_path: Path
) -> None:
    url = with_db(settings.redis, 2)
    clean_redis(url)
    remote = make_settings(
        tmp_path / "home", url, tmp_path / "remote-models", database_url=f"sqlite:///{tmp_path / 'r.db'}",
    )
    fresh_database(remote)
    stack = Stack(remote, tmp_path / "logs")
    try:
        worker = stack.start_worker("--pull-from", base_url, "--models", MODEL, timeout=120)
        assert "models from" in worker.output()
        assert ModelStore(remote.models_path).get(MODEL).model_digest == ModelStore(settings.models_path).get(MODEL).model_digest
        stack.start_api()
        reply = httpx.post(stack.base_url + "/api/generate", timeout=120, json={
            "model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 4, "temperature": 0},
        })
        assert reply.status_code == 200 and reply.json()["eval_count"] > 0
    finally:
        stack.stop()
        clean_redis(url)
        shutil.rmtree(tmp_path / "remote-models", ignore_errors=True)
