"""Jobs used against the server, on the in-process app (issue #33): a dry run is bounded in lines, in the
prompt tokens a worker counts for it and in what it puts in Redis at once, and it is one of the key's requests.
The worker is faked at the gateway's edge (its build stream), so what would travel through Redis is what the
test measures.  The same attacks against real workers and Redis: tests/integration/test_hostile_jobs.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask.testing import FlaskClient

from api import create_app
from api.gateway import Gateway
from corral.protocol import BuildRequest, StreamEvent
from corral.settings import Settings
from jobs.keys import KeyStore
from tests.helpers import MODEL

TOKENS_PER_ITEM = 10
MESSAGE_BYTES = (256 << 10) + 4096  # the items of one count message (README: about 256 KiB), and its envelope


@dataclass
class FakeWorker:
    """Answers the gateway's count messages: :data:`TOKENS_PER_ITEM` tokens an item; keeps each message's size
    as Celery would carry it (the payload's JSON)."""

    messages: list[int] = field(default_factory=list)
    items: int = 0

    def build(self, req: BuildRequest) -> Iterator[StreamEvent]:
        assert req.op == "count"
        self.messages.append(len(json.dumps(req.model_dump())))
        self.items += len(req.items)
        yield StreamEvent("result", {"counts": [TOKENS_PER_ITEM] * len(req.items)})


@pytest.fixture()
def worker(monkeypatch: pytest.MonkeyPatch) -> FakeWorker:
    fake = FakeWorker()
    monkeypatch.setattr(Gateway, "_build", fake.build)
    monkeypatch.setattr(Gateway, "worker_states", lambda gateway: [])  # no throughput measured: no ETA
    return fake


def app_with(settings: Settings, **overrides: Any) -> FlaskClient:
    return create_app(settings.model_copy(update=overrides)).test_client()


def jsonl(n: int, prompt: str = "p") -> bytes:
    return "".join(json.dumps({"prompt": f"{prompt} {i}"}) + "\n" for i in range(n)).encode()


def dry_run(client: FlaskClient, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/api/jobs?dry_run=true&model={MODEL}", data=body, content_type="application/x-ndjson",
                       headers=headers or {})


def test_dry_run_over_line_cap_is_413(settings: Settings, worker: FakeWorker) -> None:
    client = app_with(settings, dry_run_max_lines=3)
    r = dry_run(client, jsonl(5))
    assert r.status_code == 413
    assert r.get_json() == {"error": "a dry run reads at most 3 lines (CORRAL_DRY_RUN_MAX_LINES): dry-run a sample "
                                     "of the job, such as its first 3 lines"}
    assert worker.items == 0  # refused before a worker counted anything
    r = dry_run(client, jsonl(3))  # at the cap: answered
    assert r.status_code == 200 and r.get_json()["items"] == 3


def test_dry_run_over_token_cap_is_413(settings: Settings, worker: FakeWorker) -> None:
    client = app_with(settings, dry_run_max_tokens=25)
    r = dry_run(client, jsonl(5))  # 50 tokens
    assert r.status_code == 413
    assert r.get_json() == {"error": "a dry run counts at most 25 prompt tokens (CORRAL_DRY_RUN_MAX_TOKENS): 50 "
                                     "were counted by line 5; dry-run a sample of the job"}
    r = dry_run(client, jsonl(2))
    assert r.status_code == 200 and r.get_json()["prompt_tokens"] == 20


def test_dry_run_never_puts_a_whole_upload_in_one_redis_message(settings: Settings, worker: FakeWorker) -> None:
    # 24 lines of 100 KB: 2.4 MB, which went to the worker as one message (the 30 MB upload made Redis
    # grow by 85 MB); the route waits for each batch's count before it sends the next, so Redis holds one.
    r = dry_run(app_with(settings), jsonl(24, "x" * 100_000))
    assert r.status_code == 200 and r.get_json()["items"] == 24 and r.get_json()["prompt_tokens"] == 240
    assert worker.items == 24 and len(worker.messages) > 1
    assert max(worker.messages) <= MESSAGE_BYTES, worker.messages


def test_dry_run_counts_as_a_request_in_the_keys_usage(settings: Settings, worker: FakeWorker) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    client = create_app(keyed).test_client()
    key, row = KeyStore(keyed).create("dry-runner")
    headers = {"Authorization": f"Bearer {key}"}
    assert dry_run(client, jsonl(3), headers).status_code == 200
    assert dry_run(client, jsonl(2), headers).status_code == 200
    usage = client.get("/api/usage", headers=headers).get_json()["usage"]
    assert [(u["key"], u["requests"], u["prompt_tokens"]) for u in usage] == [("dry-runner", 2, 0)]
