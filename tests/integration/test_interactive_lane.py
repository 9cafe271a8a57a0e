"""The worker's interactive lane (workers/interactive.py): what a client notices of it besides its speed.

A worker told to stop (SIGTERM) finishes the replies under way and takes no new request; a request left on its
queue past the reader's patience is never run; a worker whose lane threads are all busy leaves the next request
on the queue, where a second worker of the model takes it.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from corral.modelstore.store import ModelStore
from corral.protocol import InferenceRequest, interactive_message, model_queue, new_request_id, stream_key
from harness.stack import Stack, wait_for
from tests.helpers import MODEL

pytestmark = pytest.mark.slow


def digest_of(stack: Stack) -> str:
    return ModelStore(stack.settings.models_path).get(MODEL).model_digest


def test_sigterm_finishes_the_reply_under_way_and_takes_no_new_request(isolated: Stack) -> None:
    worker, _ = isolated.start_both()
    body = {"model": MODEL, "prompt": "Tell a long story.", "options": {"num_predict": 120, "temperature": 0}}
    lines: list[dict] = []
    with httpx.stream("POST", isolated.base_url + "/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for raw in r.iter_lines():
            lines.append(json.loads(raw))
            if len(lines) == 3:
                worker.proc.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                time.sleep(0.5)  # the lane stops popping as the shutdown starts
                # asked while the worker stops: nobody takes it, so the client gets the queue timeout's 503
                late = httpx.post(isolated.base_url + "/api/generate", timeout=30,
                                  json={"model": MODEL, "prompt": "Hi", "stream": False})
    assert lines[-1].get("done") is True, lines[-1]
    assert lines[-1]["eval_count"] == len([line for line in lines if not line.get("done")])
    assert late.status_code == 503, late.text
    assert worker.proc.wait(30) == 0
    assert time.monotonic() - stopped_at < 30


def test_a_request_past_its_expiry_on_the_queue_is_not_run(isolated: Stack) -> None:
    isolated.start_both()
    digest = digest_of(isolated)
    stale = InferenceRequest(request_id=new_request_id(), kind="generate", model=MODEL, model_digest=digest,
                             prompt="Hi", options={"num_predict": 2}, enqueued_at=time.time() - 60)
    fresh = InferenceRequest(request_id=new_request_id(), kind="generate", model=MODEL, model_digest=digest,
                             prompt="Hi", options={"num_predict": 2})
    queue = model_queue(digest, "interactive")
    isolated.redis.lpush(queue, interactive_message(stale, 30.0), interactive_message(fresh, 30.0))
    wait_for(lambda: isolated.redis.xlen(stream_key(fresh.request_id)) >= 2, 30, "the fresh request's reply")
    time.sleep(0.5)
    assert isolated.redis.llen(queue) == 0
    assert isolated.redis.xlen(stream_key(stale.request_id)) == 0, "an expired request ran"


def test_a_worker_with_every_lane_thread_busy_leaves_the_next_request_to_another(isolated: Stack) -> None:
    # one decode slot, so three lane threads: three long replies take them all
    isolated.settings = isolated.settings.model_copy(update={"num_parallel": 1})
    first, _ = isolated.start_both()
    # greedy counting never ends on its own: the three replies last their 2,000 tokens
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True,
            "options": {"num_predict": 2000, "temperature": 0}}
    stop = threading.Event()

    def long_reply() -> None:
        with httpx.stream("POST", isolated.base_url + "/api/generate", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break  # the client goes away: the worker stops the reply

    def started() -> dict[bytes, bytes]:  # request -> the worker that runs it
        keys = list(isolated.redis.scan_iter(match="corral:started:*"))
        return dict(zip(keys, isolated.redis.mget(keys))) if keys else {}

    threads = [threading.Thread(target=long_reply) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        # all three started by the first worker: one decoding, two waiting for its only slot
        wait_for(lambda: len(started()) == 3, 60, "the three long requests to start")
        busy = started()
        assert len(set(busy.values())) == 1
        isolated.start_worker()
        asked = time.monotonic()
        quick = httpx.post(isolated.base_url + "/api/generate", timeout=60,
                           json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
        assert quick.status_code == 200, quick.text
        assert time.monotonic() - asked < 20  # behind the first worker's slot it would wait for 2,000 tokens
        [quick_worker] = [w for k, w in started().items() if k not in busy]
        assert quick_worker not in set(busy.values()), "the busy worker took the request"
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert first.proc.poll() is None


def test_an_earlier_apis_celery_message_is_run_during_a_rolling_upgrade(isolated: Stack) -> None:
    """An API of the version before the lane sends interactive requests as Celery tasks to
    ``corral.<digest>.interactive``; a worker of this version runs them, and its Celery consumer never reads the
    lane's own lists."""
    from corral.broker import make_celery
    from corral.protocol import LEGACY_INTERACTIVE_TASK, legacy_interactive_queue

    isolated.start_both()
    digest = digest_of(isolated)
    req = InferenceRequest(request_id=new_request_id(), kind="generate", model=MODEL, model_digest=digest,
                           prompt="Hi", options={"num_predict": 2})
    make_celery(isolated.settings).send_task(
        LEGACY_INTERACTIVE_TASK, args=[req.payload()], expires=30,
        queue=legacy_interactive_queue(model_queue(digest, "interactive")))
    wait_for(lambda: any(fields[b"e"] == b"done" for _, fields in
                         isolated.redis.xrange(stream_key(req.request_id))), 30, "the request's reply")
