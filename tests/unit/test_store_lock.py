"""The model store's writes are ordered and a delete's sweep of unused blobs never races a pull or a create."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from corral.modelstore.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MODEL_MEDIA_TYPE, ModelStore


def manifest(config: tuple[str, int], layer: tuple[str, int]) -> dict[str, Any]:
    return {
        "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": f"sha256:{config[0]}", "size": config[1]},
        "layers": [{"mediaType": MODEL_MEDIA_TYPE, "digest": f"sha256:{layer[0]}", "size": layer[1]}],
    }


def test_a_delete_waits_for_a_pull_between_its_blobs_and_its_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old = store.write_blob_bytes(b"model a")
    store.write_manifest("a", manifest(store.write_blob_bytes(b'{"a": 1}'), old))
    between, release = threading.Event(), threading.Event()
    pulled: dict[str, tuple[str, int]] = {}

    def pull() -> None:
        with store.writing():
            pulled["config"] = store.write_blob_bytes(b'{"b": 1}')
            pulled["layer"] = store.write_blob_bytes(b"model b")
            between.set()  # the blobs are in, no manifest names them yet
            release.wait(30)
            store.write_manifest("b", manifest(pulled["config"], pulled["layer"]))

    puller = threading.Thread(target=pull)
    puller.start()
    assert between.wait(30)
    deleter = threading.Thread(target=store.delete, args=("a",))
    deleter.start()
    deleter.join(0.5)
    assert deleter.is_alive(), "the delete must wait while a pull is between its blobs and its manifest"
    release.set()
    puller.join(30)
    deleter.join(30)
    assert store.get("b").model_digest == pulled["layer"][0]  # the pulled model is whole
    assert store.has_blob(pulled["layer"][0]) and not store.has_blob(old[0])  # only a's blobs were swept
