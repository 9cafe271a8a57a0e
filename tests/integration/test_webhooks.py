"""Job webhooks against a local receiver: the end of a job is POSTed, signed per the Standard Webhooks spec (the
receiver verifies it with the ``standardwebhooks`` package and the secret shown once at submit); a receiver
that fails is retried with backoff until it accepts; the attempts show on the job; OpenAI batches send OpenAI's
event shape."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from openai import OpenAI
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from harness.stack import wait_for
from tests.helpers import MODEL, submit, wait_done


class Receiver:
    """Records every POST; the path ``/flaky`` answers 500 twice before accepting."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.failures = {"/flaky": 2}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                left = receiver.failures.get(self.path, 0)
                receiver.failures[self.path] = left - 1
                self.send_response(500 if left > 0 else 204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for p, headers, body in self.received if p == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def deliveries(base_url: str, job_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base_url}/api/jobs/{job_id}").json()["webhook"]["deliveries"]  # type: ignore[no-any-return]


def test_a_finished_job_is_announced_signed(base_url: str, receiver: Receiver) -> None:
    job = submit(base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 2}}],
                 webhook_url=receiver.url + "/ok")
    secret = job["webhook"]["secret"]
    assert secret.startswith("whsec_") and job["webhook"]["url"] == receiver.url + "/ok"
    assert "secret" not in httpx.get(f"{base_url}/api/jobs/{job['id']}").json()["webhook"]  # shown once
    wait_done(base_url, job["id"])
    wait_for(lambda: receiver.posts("/ok"), 30, "the webhook")
    headers, body = receiver.posts("/ok")[0]
    event = Webhook(secret).verify(body, headers)  # raises unless the signature is right
    assert event["type"] == "job.completed" and event["data"]["id"] == job["id"]
    assert event["data"]["status"] == "completed"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(body, headers)  # another secret does not verify
    wait_for(lambda: deliveries(base_url, job["id"])[0]["status"] == "delivered", 10, "the delivery recorded")
    assert deliveries(base_url, job["id"])[0]["attempts"] == 1


def test_a_failing_receiver_is_retried_until_it_accepts(base_url: str, receiver: Receiver) -> None:
    job = submit(base_url, model=MODEL, items=[{"prompt": "Hi", "options": {"num_predict": 2}}],
                 webhook_url=receiver.url + "/flaky")
    wait_done(base_url, job["id"])
    wait_for(lambda: deliveries(base_url, job["id"])[0]["status"] == "delivered", 60, "the third attempt")
    shown = deliveries(base_url, job["id"])[0]
    assert shown["attempts"] == 3 and shown["last_error"] is None, shown
    posts = receiver.posts("/flaky")
    assert len(posts) == 3 and len({headers["webhook-id"] for headers, _ in posts}) == 1  # one event, resent


def test_cancelled_jobs_and_openai_batches(base_url: str, receiver: Receiver) -> None:
    job = submit(base_url, model=MODEL, items=[{"prompt": "Tell a long story.", "options": {"num_predict": 500}}] * 4,
                 webhook_url=receiver.url + "/cancelled", chunk_size=1)
    httpx.post(f"{base_url}/api/jobs/{job['id']}/cancel")
    wait_for(lambda: receiver.posts("/cancelled"), 30, "the cancel event")
    assert json.loads(receiver.posts("/cancelled")[0][1])["type"] == "job.cancelled"

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    upload = client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  extra_body={"webhook_url": receiver.url + "/batch"})
    secret = (batch.model_extra or {})["webhook_secret"]
    wait_for(lambda: receiver.posts("/batch"), 60, "the batch event")
    headers, body = receiver.posts("/batch")[0]
    event = Webhook(secret).verify(body, headers)
    assert (event["object"], event["type"], event["data"]) == ("event", "batch.completed", {"id": batch.id})
