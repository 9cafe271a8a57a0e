"""Which llama.cpp kernels a worker runs (corral/cpu_kernels.py, workers/main.py): a worker that serves chat
models loads the installed generation-level package; one started with ``--models`` naming only embedding models
loads the best level's libraries where ``make install`` put them beside it (an AVX-512 CPU), and there embeds
F16 models from a BF16 copy where those kernels have AVX512-BF16 (workers/weights.py).  Each worker's heartbeat
says which it runs, as the console shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from corral.cpu_kernels import choose_here, compiled_features, describe, side_libraries
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack, fresh_database
from tests.helpers import clean_redis, make_settings, with_db
from workers import weights

REDIS_DB = 12


def states(stack: Stack) -> list[dict[str, Any]]:
    keys = list(stack.redis.scan_iter(match="corral:worker:*"))
    return [json.loads(v) for v in stack.redis.mget(keys) if v]


def package_level() -> str:
    import llama_cpp

    return describe(compiled_features(llama_cpp.llama_print_system_info().decode()))


def test_the_sessions_worker_runs_the_installed_package(stack: Stack) -> None:
    (state,) = states(stack)
    assert state["cpu_kernels"]["variant"] == package_level()


def test_an_embedding_only_worker_runs_the_best_level(settings: Settings, models_dir: Path, tmp_path: Path) -> None:
    source = ModelStore(models_dir)
    store = ModelStore(tmp_path / "models")
    store.register_gguf(["scratch-minilm"], source.blob_path(source.get("all-minilm").model_digest).resolve(), link=True)
    url = with_db(settings.redis, REDIS_DB)
    clean_redis(url)
    own = make_settings(tmp_path / "home", url, tmp_path / "models", database_url=f"sqlite:///{tmp_path / 'k.db'}",
                        worker_threads=2)
    fresh_database(own)
    stack = Stack(own, tmp_path / "logs")
    try:
        stack.start_worker("--models", "scratch-minilm")
        stack.start_api()
        r = httpx.post(stack.base_url + "/api/embed", json={"model": "scratch-minilm", "input": ["kernels"]},
                       timeout=120)
        assert r.status_code == 200, r.text
        (state,) = states(stack)
    finally:
        stack.stop()
        clean_redis(url)
    best = choose_here()
    side = side_libraries()
    expected = best.name if side is not None and best is not None else package_level()
    assert state["cpu_kernels"]["variant"] == expected
    blob = store.blob_path(store.get("scratch-minilm").model_digest)
    assert weights.derived_path(blob, "bf16").exists() == ("AVX512_BF16" in state["cpu_kernels"]["features"])
