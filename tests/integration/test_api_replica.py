"""Issue #38: API replicas that die.  A client that disconnects sends a cancel; a replica that is SIGKILLed (or
whose host is lost) sends nothing.  Each reply's reader therefore holds a lease in Redis (corral/protocol.py,
renewed while it reads, ``heartbeat_ttl`` long); the worker stops a request whose lease has lapsed.

The replica lost mid-stream (its generation stopped on the worker, the other replica serving) runs across hosts,
in tests/integration/test_multihost_faults.py; here, on loopback: a request whose replica died while it was still
queued, a reader that pauses, and a request message a dying worker took with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.protocol import StreamReader, reader_key, stream_key
from corral.settings import Settings
from harness.stack import Stack, fresh_database, wait_for
from tests.helpers import CANCELLED_BY_CLIENT, LONG_GENERATE, MODEL, clean_redis, make_settings, with_db

pytestmark = pytest.mark.slow
REDIS_DB = 10
LEASE = 2.0  # heartbeat_ttl: the reader's lease is max(this, three 1 s polls) = 3 s


@pytest.fixture()
def replicas(settings: Settings, tmp_path: Path) -> Iterator[tuple[Stack, Stack]]:
    """A worker and API replica ``a``, and a second API replica ``b``: one Redis database and one SQLite file."""
    url = with_db(settings.redis, REDIS_DB)
    clean_redis(url)
    common = {"heartbeat_ttl": LEASE, "reconcile_interval": 1.0,
              "database_url": f"sqlite:///{tmp_path / 'replicas.db'}"}
    a = Stack(make_settings(tmp_path / "home", url, settings.models_path, **common), tmp_path / "logs-a")
    b = Stack(make_settings(tmp_path / "home", url, settings.models_path, **common), tmp_path / "logs-b")
    fresh_database(a.settings)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
        clean_redis(url)


def kill_group(pid: int) -> None:
    """SIGKILL the replica and every process it started (``corral serve`` runs gunicorn's master and worker)."""
    os.killpg(pid, signal.SIGKILL)


def test_request_of_a_replica_that_died_while_it_waited_is_skipped(replicas: tuple[Stack, Stack]) -> None:
    """A request still queued when its replica dies is not run at all once a worker reaches it."""
    a, b = replicas
    api_a = a.start_api()
    outcome: list[BaseException | int] = []

    def send() -> None:  # no worker yet: the reply's headers wait for the worker's first event
        try:
            outcome.append(httpx.post(a.base_url + "/api/generate", json=LONG_GENERATE, timeout=60).status_code)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    held: list[bytes] = []

    def queued() -> bool:  # the lease is taken before the message is sent: wait for both
        held[:] = list(a.redis.scan_iter(match=reader_key("*")))
        return bool(held) and any(
            a.redis.type(q) == b"list" and a.redis.llen(q) for q in a.redis.scan_iter(match="corral.*.lane"))

    wait_for(queued, 10, "the reader's lease and the queued request")
    kill_group(api_a.proc.pid)
    api_a.stopped()
    sender.join(30)
    assert outcome and isinstance(outcome[0], httpx.HTTPError)  # the client saw its replica go
    wait_for(lambda: not list(a.redis.scan_iter(match=reader_key("*"))), 10, "the lease to lapse")
    worker = b.start_worker()
    wait_for(lambda: "cancelled while queued; skipping" in worker.output(), 30, "the worker to skip the request")
    assert not CANCELLED_BY_CLIENT.findall(worker.output())
    # the skipped request's stream ends with an error, so a reader still alive after all would not wait for ever
    # (the worker logs the skip between the two writes: wait for the second)
    request_id = held[0].decode().rsplit(":", 1)[1]

    def events() -> list[bytes]:
        return [fields[b"e"] for _, fields in a.redis.xrange(stream_key(request_id))]

    wait_for(lambda: len(events()) >= 2, 10, "the skipped request's terminal event")
    assert events() == [b"start", b"error"]


def test_a_reader_that_stops_reading_keeps_its_lease(replicas: tuple[Stack, Stack]) -> None:
    """The lease is the process's to renew, not the reading loop's: a client that pauses (its socket buffers
    full, the reply's write blocked) keeps its generation."""
    a, _ = replicas
    reader = StreamReader(a.redis, "paused-reader", queue_timeout=30, lease=LEASE)
    reader.hold()
    time.sleep(2.5 * reader.lease)  # no read at all meanwhile
    assert a.redis.exists(reader_key("paused-reader"))
    reader.release()
    assert not a.redis.exists(reader_key("paused-reader"))


def test_a_request_whose_message_a_dying_worker_took_is_sent_again(replicas: tuple[Stack, Stack]) -> None:
    """A worker that takes a request's message off the queue and dies before it starts it (killed mid-BRPOP,
    partitioned, lost: an interactive task is acked early) takes the message with it.  The API sends the request
    again once it has waited ``2 * heartbeat_ttl`` for a start with the queue empty, instead of waiting for
    ``queue_timeout`` (600 s by default, 120 s here) and answering 503."""
    a, _ = replicas
    api = a.start_api()
    replies: list[httpx.Response] = []
    sender = threading.Thread(daemon=True, target=lambda: replies.append(httpx.post(
        a.base_url + "/api/chat", timeout=150, json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                     "stream": False, "options": {"num_predict": 4}})))
    # (a sampled "Hi" may end before its 4 tokens: the answer is asserted whole, its length only bounded)
    sender.start()

    def queued() -> list[bytes]:
        return [q for q in a.redis.scan_iter(match="corral.*.lane") if a.redis.type(q) == b"list"]

    wait_for(lambda: any(a.redis.llen(q) for q in queued()), 10, "the request's message")
    [stolen] = [a.redis.rpop(q) for q in queued() if a.redis.llen(q)]  # the dying worker's BRPOP
    assert stolen
    started = time.monotonic()
    a.start_worker()
    sender.join(60)
    took = time.monotonic() - started
    assert replies, f"no answer {took:.0f} s after the message was lost"
    reply = replies[0].json() if replies[0].status_code == 200 else {}
    assert reply.get("done") is True and 1 <= reply["eval_count"] <= 4 and reply["message"]["content"], replies[0].text
    assert "sending it again" in api.output()
    print(f"lost message: answered {took:.1f} s after it was taken (pickup bound {2 * LEASE:g} s)")
