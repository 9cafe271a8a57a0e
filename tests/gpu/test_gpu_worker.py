"""GPU workers (``pytest -m gpu``): skipped unless a CUDA GPU and a CUDA build of llama-cpp-python are here.

Build that with ``CORRAL_CUDA=1 make install``.  The checks: ``--gpu N`` pins the process to that GPU
(``CUDA_VISIBLE_DEVICES``), the model really sits in GPU memory (the worker process holds at least the
model's size there, per ``nvidia-smi``), and ``/api/ps`` reports ``size_vram``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import pytest

from corral.settings import Settings
from harness.stack import Stack, fresh_database
from tests.helpers import MODEL, clean_redis, make_settings, with_db


def _gpu_ready() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: no NVIDIA GPU here"
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed"
    if not llama_cpp.llama_supports_gpu_offload():
        return "llama-cpp-python was built without CUDA (CORRAL_CUDA=1 make install)"
    return None


WHY_NOT = _gpu_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


@pytest.fixture(scope="module")
def gpu_stack(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Stack:
    home = tmp_path_factory.mktemp("gpu")
    url = with_db(settings.redis, 3)
    clean_redis(url)
    own = make_settings(home / "home", url, settings.models_path, database_url=f"sqlite:///{home / 'gpu.db'}")
    fresh_database(own)
    stack = Stack(own, home / "logs")
    stack.start_worker("--gpu", "0", "--models", MODEL, timeout=180)
    stack.start_api()
    yield stack  # type: ignore[misc]
    stack.stop()
    clean_redis(url)


def _used_mib(pid: int) -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout
    return sum(int(used) for p, used in (line.split(", ") for line in out.splitlines() if line) if int(p) == pid)


def test_gpu_flag_pins_cuda_visible_devices(gpu_stack: Stack) -> None:
    states = [json.loads(v) for v in gpu_stack.redis.mget(list(gpu_stack.redis.scan_iter(match="corral:worker:*"))) if v]
    assert [(s["gpu"], s["cuda_visible_devices"]) for s in states] == [(0, "0")]
    assert states[0]["name"].startswith("gpu0@")


def test_model_is_offloaded_and_ps_reports_vram(gpu_stack: Stack) -> None:
    reply = httpx.post(gpu_stack.base_url + "/api/generate", timeout=300, json={
        "model": MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 8, "temperature": 0},
    })
    assert reply.status_code == 200 and reply.json()["eval_count"] > 0
    models = httpx.get(gpu_stack.base_url + "/api/ps").json()["models"]
    assert models and models[0]["size_vram"] == models[0]["size"] > 0
    worker_pid = [json.loads(v) for v in gpu_stack.redis.mget(list(gpu_stack.redis.scan_iter(match="corral:worker:*")))][0]["pid"]
    model_mib = models[0]["size"] // (1 << 20)
    assert _used_mib(worker_pid) >= model_mib, "all layers offloaded: the weights live in GPU memory"
