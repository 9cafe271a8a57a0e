"""URLs chosen by a client or an upstream server, used against the server's own network (issue #33, items 4, 2
and 7), on the in-process app: a ``webhook_url`` that injects headers, spells 127.0.0.1 oddly, carries
credentials or points at loopback, link-local or private addresses is a 400 at submission; a pull registry that
redirects to a host ``CORRAL_PULL_HOSTS`` does not allow, or to a private address, is not followed; an upstream
error body never reaches the error message."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from corral.settings import Settings
from tests.helpers import MODEL

SECRET = "internal-secret-7f3a"  # what an internal service answers; must never show in an error


class Canned:
    """An HTTP server on 127.0.0.1 answering each path with a fixed (status, headers, body); it records every
    path it is asked for."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.asked: list[str] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                canned.asked.append(self.path)
                status, headers, body = canned.routes.get(self.path, (404, {}, b"{}"))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def registry() -> Iterator[Canned]:
    served = Canned()
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture()
def internal() -> Iterator[Canned]:
    """A service on the server's own network that answers anyone who asks (a Redis, a metadata endpoint)."""
    served = Canned()
    served.routes["/internal"] = (401, {}, SECRET.encode())
    yield served
    served.server.shutdown()
    served.server.server_close()


def app_with(settings: Settings, **overrides: Any) -> FlaskClient:
    from api import create_app

    app: Flask = create_app(settings.model_copy(update=overrides))
    return app.test_client()


def job_count(client: FlaskClient) -> int:
    return len(client.get("/api/jobs", query_string={"limit": 1000}).get_json()["jobs"])


# -- webhook_url at submission ---------------------------------------------------------------------------------

HOSTILE_URLS = [
    ("http://127.0.0.1:18081/a\r\nX-Injected: 1\r\n", "whitespace"),  # header injection (httpx: InvalidURL)
    ("http://127.0.0.1:18081/a b", "whitespace"),
    ("http://2130706433:18081/", "unusual form"),  # 127.0.0.1 as one integer
    ("http://0x7f.0.0.1:18081/", "unusual form"),
    ("http://0177.0.0.1:18081/", "unusual form"),
    ("http://127.1:18081/", "unusual form"),
    ("http://user:pass@example.com/", "user name or password"),
    ("http://example.com@127.0.0.1:18081/", "user name or password"),
    ("ftp://example.com/", "http or https"),
    ("http:///nohost", "no valid host"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://169.254.169.254/latest/meta-data/", "public address"),  # the cloud metadata service
    ("http://10.0.0.1:6379/", "public address"),
    ("http://192.168.1.1/", "public address"),
    ("http://172.16.0.1/", "public address"),
    ("http://100.64.0.1/", "public address"),  # carrier-grade NAT
    ("http://0.0.0.0:18081/", "public address"),
    ("http://224.0.0.1/", "public address"),  # multicast
    ("http://240.0.0.1/", "public address"),  # reserved
    ("http://[::1]:18081/", "public address"),  # IPv6 loopback, outside the tests' 127.0.0.0/8 allowance
    ("http://[fd00::1]/", "public address"),
    ("http://[::ffff:a9fe:a9fe]/", "public address"),  # 169.254.169.254 inside IPv6
]


@pytest.mark.parametrize(("url", "why"), HOSTILE_URLS)
def test_hostile_webhook_urls_are_refused_at_submission(client: FlaskClient, url: str, why: str) -> None:
    before = job_count(client)
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], "webhook_url": url})
    assert r.status_code == 400, r.get_data(as_text=True)
    message = r.get_json()["error"]
    assert message.startswith("webhook_url") and why in message, message
    assert "\r" not in message and "\n" not in message
    assert job_count(client) == before


def test_loopback_webhooks_are_refused_unless_the_allow_setting_opens_them(settings: Settings) -> None:
    closed = app_with(settings, webhook_allow_networks=[])
    for url in ("http://127.0.0.1:18081/hook", "http://localhost:18081/hook", "http://[::ffff:127.0.0.1]:18081/"):
        r = closed.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], "webhook_url": url})
        assert r.status_code == 400 and "CORRAL_WEBHOOK_ALLOW_NETWORKS" in r.get_json()["error"], (url, r.get_json())
    # The OpenAI shape names the param.
    upload = closed.post("/v1/files", data={"purpose": "batch", "file": (_batch_line(), "in.jsonl")})
    assert upload.status_code == 200, upload.get_data(as_text=True)
    r = closed.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "webhook_url": "http://localhost:18081/hook"})
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"] == "webhook_url" and error["type"] == "invalid_request_error"


def _batch_line() -> Any:
    import io

    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    return io.BytesIO(json.dumps(line).encode())


# -- pull ------------------------------------------------------------------------------------------------------

def pull_error(client: FlaskClient, name: str) -> str:
    r = client.post("/api/pull", json={"model": name, "insecure": True, "stream": False})
    assert r.status_code != 200, r.get_data(as_text=True)
    return str(r.get_json()["error"])


def test_a_registry_redirect_to_a_host_outside_pull_hosts_is_not_followed(
    settings: Settings, registry: Canned, internal: Canned
) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (
        302, {"Location": f"http://localhost:{internal.port}/internal"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert error == (f"pull model manifest: the registry redirected to localhost:{internal.port}, which "
                     "CORRAL_PULL_HOSTS does not allow")
    assert internal.asked == []  # never asked, so nothing of its answer could be read back


def test_a_wildcard_pull_host_does_not_reach_private_addresses_through_a_redirect(
    settings: Settings, registry: Canned, internal: Canned
) -> None:
    """``*`` allows every host name, but only on public addresses: a redirect to a name that resolves to
    loopback is refused at connect time (127.0.0.1, named exactly, stays reachable)."""
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}", "*"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (
        307, {"Location": f"http://localhost:{internal.port}/internal"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert error.startswith("pull failed: localhost resolves to an address this server does not reach"), error
    assert internal.asked == [] and SECRET not in error


def test_a_blob_redirect_to_an_odd_spelling_of_loopback_is_refused(settings: Settings, registry: Canned) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}", "*"])
    manifest = {"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 2},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "1" * 64,
                            "size": 2}]}
    registry.routes["/v2/library/tiny/manifests/latest"] = (200, {}, json.dumps(manifest).encode())
    registry.routes[f"/v2/library/tiny/blobs/sha256:{'0' * 64}"] = (
        302, {"Location": f"http://2130706433:{registry.port}/elsewhere"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert "redirected to a URL that has an IPv4 address in an unusual form" in error, error
    assert "/elsewhere" not in registry.asked


def test_an_upstream_error_body_is_not_echoed_in_the_pull_error(settings: Settings, registry: Canned) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (500, {}, f"-ERR {SECRET}".encode())
    assert pull_error(client, f"127.0.0.1:{registry.port}/library/tiny") == "pull model manifest: 500"


# -- two workers, one due delivery -----------------------------------------------------------------------------

def test_two_workers_never_claim_the_same_due_delivery(settings: Settings) -> None:
    """Each worker's sender claims a due delivery with a conditional UPDATE before it sends it: a second worker
    that read the same row finds it claimed, and an attempt recorded late cannot overwrite a newer one."""
    import uuid

    from jobs.db import sessions
    from jobs.models import Job, JobStatus, WebhookDelivery, utcnow
    from jobs.webhooks import Sender

    job_id, delivery_id = f"job_{uuid.uuid4().hex[:24]}", f"msg_{uuid.uuid4().hex[:24]}"
    with sessions(settings)() as session:
        session.add(Job(id=job_id, kind="generate", model=MODEL, model_digest="0" * 64, status=JobStatus.COMPLETED,
                        chunk_size=1, webhook_url="http://127.0.0.1:9/hook"))
        session.flush()
        session.add(WebhookDelivery(id=delivery_id, job_id=job_id, event="job.completed", url="http://127.0.0.1:9/hook",
                                    payload={}, status="pending", attempts=0, created_at=utcnow(),
                                    next_attempt_at=utcnow().replace(year=2020)))  # due before anything else
        session.commit()
    first, second = Sender(settings), Sender(settings)
    claimed = [d for d in first.claim(1000) if d.id == delivery_id]
    assert len(claimed) == 1 and not [d for d in second.claim(1000) if d.id == delivery_id]
    first.record(claimed[0], "delivery failed: HTTP 500")
    first.record(claimed[0], None)  # the same attempt recorded twice: the second finds attempts moved on
    with sessions(settings)() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and (row.attempts, row.status, row.last_error) == (1, "pending", "delivery failed: HTTP 500")
        session.delete(row)
        session.commit()
