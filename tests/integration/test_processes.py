"""Real process lifecycles: a worker dying mid-stream, no worker at all, and `corral up` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.settings import Settings
from harness.processes import die_with_parent, free_port, redis_reachable
from harness.stack import Stack, wait_for
from tests.helpers import MODEL, ROOT


@pytest.mark.slow
def test_worker_killed_mid_stream_ends_the_stream_with_an_error(isolated: Stack) -> None:
    worker, _ = isolated.start_both()
    body = {"model": MODEL, "prompt": "Tell a long story.", "options": {"num_predict": 3000}}
    lines: list[dict] = []
    with httpx.stream("POST", isolated.base_url + "/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        killed_at = None
        for raw in r.iter_lines():
            lines.append(json.loads(raw))
            if len(lines) == 3:
                worker.proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
    assert killed_at is not None
    assert time.monotonic() - killed_at < 15, "the client must not hang on a dead worker"
    assert "error" in lines[-1] and "stopped responding" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)


def test_no_worker_for_the_model_gives_a_clear_503(isolated: Stack) -> None:
    from api import create_app

    client = create_app(isolated.settings).test_client()
    started = time.monotonic()
    resp = client.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False})
    assert resp.status_code == 503
    assert "no worker started the request within 4s" in resp.get_json()["error"]
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_corral_up_runs_everything_with_a_private_redis_and_stops_on_ctrl_c(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there: `up` must start its own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_", "REDIS_", "DATABASE_"))}
    env.update(CORRAL_HOME=str(tmp_path / "home"), OLLAMA_MODELS=str(settings.models_path), REDIS_URL=dead_redis)
    with open(tmp_path / "up.log", "wb") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", str(port)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                return httpx.get(base, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 60, "corral up")
        reply = httpx.post(
            base + "/api/generate",
            json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 3, "temperature": 0}},
            timeout=120,
        )
        assert reply.status_code == 200 and reply.json()["eval_count"] == 3
        text = (tmp_path / "up.log").read_text()
        assert "started private Redis" in text
        url = text.split("started private Redis at ", 1)[1].split()[0]
        assert redis_reachable(url)
        assert (tmp_path / "home" / "redis" / "redis.log").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, (tmp_path / "up.log").read_text()
    assert not redis_reachable(url), "the private Redis must stop with corral up"
    with pytest.raises(httpx.ConnectError):
        httpx.get(base, timeout=2)


@pytest.mark.slow
def test_max_queue_bounds_waiting_requests_with_ollamas_503(isolated: Stack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # No worker yet: every request waits in the model's queue, which OLLAMA_MAX_QUEUE=1 bounds.
    isolated.settings = isolated.settings.model_copy(update={"max_queue": 1, "queue_timeout": 60.0})
    isolated.start_api()
    url = isolated.base_url + "/api/generate"
    short = {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}

    def waiting() -> int:
        return sum(int(isolated.redis.zcard(k)) for k in isolated.redis.scan_iter(match="corral:waiting:*"))

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url, json=short, timeout=120)
        wait_for(lambda: waiting() == 1, 20, "the first request to wait")
        refused = httpx.post(url, json=short, timeout=30)
        assert refused.status_code == 503
        assert refused.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
        assert waiting() == 1  # the refused request did not take a place in the queue
        isolated.start_worker()
        assert first.result().status_code == 200
    assert waiting() == 0
