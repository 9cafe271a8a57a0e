"""Which llama.cpp kernels a worker runs (corral/cpu_kernels.py, workers/main.py): a worker that serves chat
models loads the installed generation-level package; one started with ``--models`` naming only embedding models
loads the best level's libraries where ``make install`` put them beside it (an AVX-512 CPU), and there embeds
F16 models from a BF16 copy where those kernels have AVX512-BF16 (workers/weights.py).  Each worker's heartbeat
says which it runs, as the console shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.cpu_kernels import choose_here, compiled_features, describe, side_libraries
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack, fresh_database
from tests.helpers import clean_redis, make_settings, with_db
from workers import weights

REDIS_DB = 12
ROOT = Path(__file__).resolve().parents[2]


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
    side = side_libraries()
    # the best level where make install kept it; where the AMX level failed its check, the one built instead
    expected = side.name if side is not None and choose_here() is not None else package_level()
    assert state["cpu_kernels"]["variant"] == expected
    features = state["cpu_kernels"]["features"]
    blob = store.blob_path(store.get("scratch-minilm").model_digest)
    # auto: a Q8_0 copy on AMX kernels, else a BF16 copy on AVX512-BF16 kernels, else the F16 weights themselves
    assert weights.derived_path(blob, "q8_0").exists() == ("AMX_INT8" in features)
    assert weights.derived_path(blob, "bf16").exists() == ("AVX512_BF16" in features and "AMX_INT8" not in features)


def kernel_check(libdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "workers.kernel_check", str(libdir), "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


# What make install left beside the package, and on a CPU with AMX the verdict of its AMX check (workers/kernel_check.py)
BEST, SIDE = choose_here(), side_libraries()
AMX_RECORD = SIDE.parent / "amx-check.txt" if SIDE is not None else None
VERDICT = AMX_RECORD.read_text().strip() if AMX_RECORD is not None and AMX_RECORD.exists() else None


@pytest.mark.skipif(BEST is None or BEST.name != "sapphirerapids", reason="the AMX kernels run only on a CPU with AMX")
@pytest.mark.skipif(SIDE is None, reason="no kernel levels beside the package (a CUDA build, or a venv not from make)")
@pytest.mark.skipif(SIDE is not None and SIDE.name != "sapphirerapids" and VERDICT is None,
                    reason="make install did not try AMX (CORRAL_CPU_AMX=0)")
@pytest.mark.skipif(VERDICT is not None and "not permitted" in VERDICT, reason=f"this machine's Linux refuses AMX: {VERDICT}")
def test_the_amx_level_passes_its_kernel_check_where_linux_permits_amx() -> None:
    """make install keeps the AMX level only where its check passed, and records the verdict otherwise: a crash, a
    failed build or a wrong vector there is a defect of the fix (cpu_kernels.patch_source), not of the machine."""
    assert SIDE is not None and SIDE.name == "sapphirerapids", f"make install left the AMX level out: {VERDICT}"
    done = kernel_check(SIDE)
    assert done.returncode == 0 and "kernel check passed" in done.stdout, done.stdout + done.stderr[-2000:]


def test_the_kernel_check_refuses_a_library_without_amx() -> None:
    import llama_cpp

    package = Path(llama_cpp.__file__).parent / "lib"
    done = kernel_check(package)  # the installed package is never the AMX level (generation drops it)
    assert done.returncode == 1 and "has no AMX kernels" in done.stdout, done.stdout + done.stderr[-2000:]
