"""CPU workers decode Q4_1 models from a Q8_0 copy of their weights (workers/weights.py), made once in the store.

The copy is what makes batched decoding fast on a CPU (llama.cpp has tiled kernels for Q8_0, not for Q4_1), so
a user notices it only as speed; these tests pin what must hold around it: the worker really loads the copy,
it is a valid Q8_0 GGUF made once, the store deletes it with its model, and a store that cannot hold it
still serves the model.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from corral.modelstore.gguf_meta import read_gguf_metadata
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from workers import weights
from workers.engine import LoadedModel, LoadSpec

pytestmark = pytest.mark.slow

Q8_0 = 7  # general.file_type of a GGUF whose weights are mostly Q8_0


def smollm2_blob(models_dir: Path) -> Path:
    store = ModelStore(models_dir)
    return store.blob_path(store.get("smollm2").model_digest)


def test_a_cpu_worker_with_several_slots_chats_from_a_q8_0_copy(base_url: str, settings: Settings) -> None:
    r = httpx.post(base_url + "/api/generate", json={
        "model": "smollm2", "prompt": "Once upon a time,", "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 8},
    }, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["eval_count"] == 8 and r.json()["response"]
    copy = weights.derived_path(smollm2_blob(settings.models_path), "q8_0")
    assert copy.is_file()
    assert read_gguf_metadata(copy)[0]["general.file_type"] == Q8_0
    # /api/show still describes the model that was pulled
    shown = httpx.post(base_url + "/api/show", json={"model": "smollm2"}, timeout=30).json()
    assert shown["details"]["quantization_level"] == "Q4_1"


def test_the_copy_is_made_once_loads_and_goes_with_its_model(models_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.register_gguf(["scratch:q4"], smollm2_blob(models_dir).resolve(), link=True)
    blob = store.blob_path(store.get("scratch:q4").model_digest)

    copy = weights.prepare(blob, "q8_0", threads=2)
    assert copy == weights.derived_path(blob, "q8_0") and copy.is_file()
    made = copy.stat()
    assert weights.prepare(blob, "q8_0", threads=2) == copy
    assert copy.stat().st_mtime_ns == made.st_mtime_ns and copy.stat().st_ino == made.st_ino, "made twice"
    assert [p.name for p in copy.parent.iterdir()] == [copy.name], "a temporary file was left behind"

    model = LoadedModel(LoadSpec(path=blob, embedding=False, n_ctx=256, n_gpu_layers=0, n_threads=1, parallel=2,
                                 weights="q8_0"))
    try:
        assert model.path == copy
        result = model.generate(
            model.raw_prompt("Once upon a time,"), {"temperature": 0, "num_predict": 6},
            stops=[], fmt=None, on_text=lambda _: False, cancelled=lambda: False,
        )
        assert result.eval_count == 6
    finally:
        model.close()

    store.delete("scratch:q4")
    assert not copy.exists(), "deleting the model left its Q8_0 copy in the store"


def test_a_store_that_cannot_hold_the_copy_still_serves_the_model(models_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.register_gguf(["scratch:q4"], smollm2_blob(models_dir).resolve(), link=True)
    blob = store.blob_path(store.get("scratch:q4").model_digest)
    (store.root / "derived").write_text("not a directory")  # as a read-only or full disk would refuse it

    assert weights.prepare(blob, "q8_0", threads=2) == blob
