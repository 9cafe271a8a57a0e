"""A fault stays with the request that caused it, with real processes and the real model.

The API refuses what it knows would hurt a worker (tests/api/test_limits.py); these tests reach past it, as a
bug or an old stored job would, to check what happens then: a decode with bad token ids fails only its own
sequence, a chunk whose task raises is released at once and its item failed after three tries, an item that
kills its worker every time is failed after three crashes while `corral up` starts the worker again and keeps
answering, and other users' work finishes normally throughout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from corral.broker import Broker
from corral.errors import BadRequest
from corral.modelstore.store import ModelStore
from corral.redis_connection import redis_client
from corral.settings import Settings
from harness.processes import die_with_parent, free_port
from harness.stack import Stack, wait_for
from jobs.db import sessions
from jobs.models import Item
from jobs.service import JobService
from tests.helpers import MODEL, ROOT, submit, wait_done
from workers.engine import LoadedModel, LoadSpec

GREEDY = {"temperature": 0, "num_predict": 12}


def service(settings: Settings) -> JobService:
    """The job service as the API builds it, used directly: it trusts its caller to have validated each line,
    which lets a test store lines the API would refuse."""
    return JobService(settings, ModelStore(settings.models_path), Broker(settings))


def attempts_and_errors(settings: Settings, job_id: str) -> dict[str, tuple[int, str | None, str]]:
    with sessions(settings)() as session:
        rows = session.execute(select(Item.custom_id, Item.attempts, Item.error, Item.state).where(Item.job_id == job_id))
        return {str(cid): (attempts, error, state) for cid, attempts, error, state in rows}


def test_a_sequence_with_token_ids_outside_the_vocabulary_fails_alone(models_dir: Path) -> None:
    store = ModelStore(models_dir)
    path = store.blob_path(store.get(MODEL).model_digest)
    model = LoadedModel(LoadSpec(path=path, embedding=False, n_ctx=512, n_gpu_layers=0, n_threads=1, parallel=2))
    try:
        prompt, stops = model.chat_prompt([{"role": "user", "content": "Name a colour."}])

        def text_of(handle: Any) -> str:
            pieces: list[str] = []
            handle.stream(lambda t: pieces.append(t) and False, lambda: False)
            return "".join(pieces)

        alone = text_of(model.start(prompt, GREEDY, stops=stops, fmt=None, interactive=True))
        good = model.start(prompt, GREEDY, stops=stops, fmt=None, interactive=True)
        bad = model.start([*prompt[:-1], 10_000_000, prompt[-1]], GREEDY, stops=stops, fmt=None, interactive=True)
        with pytest.raises(BadRequest, match="outside the model's vocabulary"):
            text_of(bad)
        assert text_of(good) == alone  # the other sequence in the same loop is untouched
    finally:
        model.close()


def test_a_chunk_whose_task_raises_is_released_and_its_item_failed_after_three_tries(
    settings: Settings, stack: Stack
) -> None:
    """A line the worker cannot turn into a request (stored before the API typed every field) raises in the
    task; the chunk goes back to the queue at once, three times, then the item is failed and the job ends."""
    good = {"prompt": "Say yes.", "options": GREEDY}
    job = service(settings).submit(
        kind="generate", model=MODEL, chunk_size=1,
        items=[("good-1", good), ("bad", {"prompt": "b", "system": 1}), ("good-2", good)],
    )
    done = wait_done(stack.base_url, job["id"], timeout=300)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 2 and done["counts"]["failed"] == 1
    rows = attempts_and_errors(settings, job["id"])
    attempts, error, state = rows["bad"]
    assert state == "failed" and attempts == 3 and error is not None and error.startswith("failed 3 times: ValidationError")
    assert rows["good-1"][0] == rows["good-2"][0] == 1  # the others ran once


@pytest.fixture()
def corral_up(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Settings, Path]]:
    """`corral up` with a private Redis, its own SQLite file, quick heartbeats; yields (URL, settings, log)."""
    port = free_port()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_", "REDIS_", "DATABASE_"))}
    env.update(CORRAL_HOME=str(home), OLLAMA_MODELS=str(settings.models_path), CORRAL_HEARTBEAT_TTL="3",
               CORRAL_RECONCILE_INTERVAL="1", CORRAL_WORKER_THREADS="1", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "up", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    base = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(base, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 120, "corral up")
        redis_url = log.read_text().split("started private Redis at ", 1)[1].split()[0]
        yield base, Settings(home=home, models_dir=settings.models_path, redis_url=redis_url), log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def live_workers(settings: Settings) -> set[str]:
    with redis_client(settings.redis) as client:
        return {key.decode().split(":", 2)[2] for key in client.scan_iter(match="corral:worker:*")}


def segfault_while_running(settings: Settings, job_id: str, custom_id: str, stop: threading.Event) -> None:
    """Send SIGSEGV to the live workers once per claim of one item (its ``attempts`` count), as a native crash in
    that item's request would."""
    killed = 0
    while not stop.wait(0.2):
        with sessions(settings)() as session:
            row = session.execute(select(Item.state, Item.attempts).where(Item.job_id == job_id,
                                                                          Item.custom_id == custom_id)).first()
        if row is None or row[0] != "running" or row[1] <= killed:
            continue
        for name in live_workers(settings):
            with contextlib.suppress(ProcessLookupError):  # a heartbeat key outlives its worker for a moment
                os.kill(int(name.split("-", 1)[1].split("@", 1)[0]), signal.SIGSEGV)
        killed = row[1]


@pytest.mark.slow
def test_corral_up_restarts_a_dead_worker_and_fails_an_item_that_crashes_it_every_time(
    corral_up: tuple[str, Settings, Path],
) -> None:
    base, settings, log = corral_up
    wait_for(lambda: bool(live_workers(settings)), 60, "the worker's heartbeat")
    [first] = live_workers(settings)
    os.kill(int(first.split("-", 1)[1].split("@", 1)[0]), signal.SIGKILL)  # cpu-<pid>@host
    wait_for(lambda: bool(live_workers(settings) - {first}), 120, "a new worker")
    assert "worker exited with status -9; starting it again" in log.read_text()

    # An item that kills its worker (a native crash) each time it runs, beside ordinary items and another user's
    # job: the item is failed after three crashes, the rest completes.  No input is known to crash llama.cpp any
    # more (a grammar bomb did, and is refused at the API and in the worker: test_hostile_crashes.py), so the
    # crash comes from outside: SIGSEGV to the worker while it runs that item, each time it does.
    crashing = service(settings).submit(
        kind="generate", model=MODEL, chunk_size=1,
        items=[("crash", {"prompt": "Tell a long story.", "options": {"temperature": 0, "num_predict": 4000}})],
    )
    stop = threading.Event()
    crasher = threading.Thread(target=segfault_while_running, args=(settings, crashing["id"], "crash", stop), daemon=True)
    crasher.start()
    other = submit(base, kind="generate", chunk_size=1, options=GREEDY,
                   items=[{"custom_id": f"o{i}", "prompt": f"Count to {i}."} for i in range(3)])
    try:
        done = wait_done(base, crashing["id"], timeout=600)
    finally:
        stop.set()
        crasher.join(10)
    assert done["status"] == "completed" and done["counts"]["failed"] == 1
    attempts, error, _ = attempts_and_errors(settings, crashing["id"])["crash"]
    assert attempts == 3 and error is not None and "stopped (a crash or a kill) 3 times" in error
    assert log.read_text().count("worker exited with status -11; starting it again") >= 1
    assert wait_done(base, other["id"], timeout=600)["counts"]["succeeded"] == 3
    reply = httpx.post(base + "/api/generate", timeout=120,
                       json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 3, "temperature": 0}})
    assert reply.status_code == 200 and reply.json()["eval_count"] == 3  # corral up still answers and serves
