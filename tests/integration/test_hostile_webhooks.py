"""Webhook receivers that attack the workers that call them (issue #33, items 2, 3 and 4), against real worker
processes: a delivery whose URL httpx cannot even parse does not stop other jobs' webhooks; a receiver that
drips its answer a byte a second does not hold up the worker's heartbeat (nor a stream the worker is running);
a host name that resolves to loopback is refused at connect time when no setting allows it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from corral.protocol import worker_key
from corral.settings import Settings
from harness.stack import Stack, wait_for
from jobs.db import sessions
from jobs.models import WebhookDelivery, utcnow
from tests.helpers import MODEL, own_stack, submit, wait_done

DRIP_SECONDS = 5  # past the stack's 2 s heartbeat TTL, well inside the sender's 10 s deadline


class Receiver:
    """Records every POST; ``/slow`` sends its status line a byte a second for :data:`DRIP_SECONDS`."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []
        self.dripping = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                if self.path == "/slow":
                    receiver.dripping.set()
                    for byte in answer[:DRIP_SECONDS]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1)
                    answer = answer[DRIP_SECONDS:]
                self.wfile.write(answer)
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.received if p == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


FAST = {"heartbeat_ttl": 2.0, "reconcile_interval": 1.0}


@pytest.fixture(scope="module")
def allowed(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose webhooks may reach loopback (the tests' receivers), with a 2 s heartbeat TTL."""
    with own_stack(settings, tmp_path_factory.mktemp("hostile-webhooks"), 13, **FAST) as stack:
        yield stack


def deliveries(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{stack.base_url}/api/jobs/{job_id}").json()["webhook"]["deliveries"]  # type: ignore[no-any-return]


def test_header_injection_url_does_not_block_other_webhooks(allowed: Stack, receiver: Receiver) -> None:
    """A row whose URL injects a header (as the API stored it before URLs were parsed strictly): httpx raises
    InvalidURL, which is not an HTTPError.  That one delivery fails; the next job's is delivered."""
    bad = submit(allowed.base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 1}}],
                 webhook_url=receiver.url + "/first")
    wait_done(allowed.base_url, bad["id"])
    wait_for(lambda: deliveries(allowed, bad["id"])[0]["status"] == "delivered", 20, "the first job's webhook")
    with sessions(allowed.settings)() as session:  # it is due before any other, with a URL httpx refuses
        session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == bad["id"]).values(
            url=f"{receiver.url}/a\r\nX-Injected: 1\r\n", status="pending", attempts=0, delivered_at=None,
            next_attempt_at=utcnow().replace(year=2020)))
        session.commit()
    good = submit(allowed.base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 1}}],
                  webhook_url=receiver.url + "/second")
    wait_done(allowed.base_url, good["id"])
    wait_for(lambda: deliveries(allowed, good["id"])[0]["status"] == "delivered", 20, "the other job's webhook")
    shown = deliveries(allowed, bad["id"])[0]
    assert shown["attempts"] >= 1 and shown["last_error"] == "delivery failed: invalid URL", shown
    assert not any("x-injected" in headers for _, headers in receiver.received)


def test_a_slow_receiver_does_not_stop_the_heartbeat_or_a_stream_on_that_worker(
    allowed: Stack, receiver: Receiver
) -> None:
    job = submit(allowed.base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 1}}],
                 webhook_url=receiver.url + "/slow")
    wait_done(allowed.base_url, job["id"])
    assert receiver.dripping.wait(20), "the webhook never came"
    started, missing = time.monotonic(), []
    [name] = allowed.worker_names()
    key = worker_key(name)
    lines: list[dict[str, Any]] = []

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Tell me a long story about a dragon.", "options": {"num_predict": 300}}
        with httpx.stream("POST", allowed.base_url + "/api/generate", json=body, timeout=60) as reply:
            lines.extend(json.loads(line) for line in reply.iter_lines() if line)

    generate = threading.Thread(target=stream)
    generate.start()
    while time.monotonic() - started < DRIP_SECONDS + 1:  # while the receiver drips, and a beat after
        if not allowed.redis.exists(key):
            missing.append(round(time.monotonic() - started, 1))
        time.sleep(0.2)
    generate.join(60)
    assert missing == [], f"the worker's heartbeat key lapsed at {missing} s"
    assert lines and lines[-1].get("done") is True and "error" not in lines[-1], lines[-1:]
    wait_for(lambda: deliveries(allowed, job["id"])[0]["status"] == "delivered", 20, "the slow delivery")


def test_a_name_resolving_to_loopback_is_refused_at_connect_time(
    settings: Settings, tmp_path: Path, receiver: Receiver
) -> None:
    """Without CORRAL_WEBHOOK_ALLOW_NETWORKS: the server's own CORRAL_WEBHOOK_URL is the administrator's receiver
    and is delivered though it is on loopback (a single-user `corral up` with a local hook keeps working), while a
    job's URL whose name resolves to loopback at connect time (a DNS rebinding after submission, stood for by a
    row changed in SQL) is refused after DNS, before any connection.  The owner reads a fixed phrase, not what
    the socket said; a loopback URL is a 400 at submission."""
    with own_stack(settings, tmp_path, 14, webhook_allow_networks=[], webhook_url=f"{receiver.url}/default",
                   **FAST) as closed:
        job = submit(closed.base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 1}}])
        wait_done(closed.base_url, job["id"])
        wait_for(lambda: deliveries(closed, job["id"])[0]["status"] == "delivered", 20, "the default receiver")
        with sessions(closed.settings)() as session:
            session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job["id"]).values(
                url=f"http://localhost:{receiver.port}/rebound", status="pending", attempts=0, delivered_at=None,
                next_attempt_at=utcnow().replace(year=2020)))
            session.commit()
        wait_for(lambda: deliveries(closed, job["id"])[0]["attempts"] >= 1, 20, "the rebound attempt")
        shown = deliveries(closed, job["id"])[0]
        assert shown["status"] == "pending" and shown["last_error"] == "delivery failed: address not allowed", shown
        refused = submit_status(closed, webhook_url=f"http://localhost:{receiver.port}/own")
        assert refused == 400
    assert len(receiver.posts("/default")) == 1
    assert receiver.posts("/rebound") == [] and receiver.posts("/own") == []


def submit_status(stack: Stack, **body: Any) -> int:
    r = httpx.post(stack.base_url + "/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], **body}, timeout=60)
    return r.status_code
