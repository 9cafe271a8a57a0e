"""What a user reads after cancelling a job whose items never ran (issue #38: a cancel changes the job and its
chunks, not its items, which read as cancelled through jobs/readstates.py): its counts, its result lines, the
console's page, the metrics, an OpenAI batch's error file, the queued-items quota, usage and retry, the same
before and after the reconciler settles the rows.  The real app in process with a Redis of its own and no worker,
so nothing runs an item: every pending item is still pending when the cancel comes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update

from corral.settings import Settings
from harness.stack import fresh_database
from jobs import transitions
from jobs.db import engine_for, sessions
from jobs.keys import KeyLimits, KeyStore
from jobs.models import Item, ItemState, Job, utcnow
from jobs.reconcile import Reconciler
from tests.helpers import MODEL, clean_redis, make_settings, with_db

REDIS_DB = 15
ITEMS = 10


@contextmanager
def in_process(redis_url: str, models_dir: Path, home: Path, **overrides: object) -> Iterator[Flask]:
    """An in-process API with a Redis database and SQLite file of its own, and no worker."""
    from api import create_app

    url = with_db(redis_url, REDIS_DB)
    clean_redis(url)
    own = make_settings(home / "home", url, models_dir, database_url=f"sqlite:///{home / 'reads.db'}", chunk_size=3,
                        **overrides)
    fresh_database(own)
    try:
        yield create_app(own)
    finally:
        engine_for(own.database).dispose()
        clean_redis(url)


@pytest.fixture()
def own_app(redis_url: str, models_dir: Path, tmp_path: Path) -> Iterator[Flask]:
    with in_process(redis_url, models_dir, tmp_path) as app:
        yield app


@pytest.fixture()
def keyed_app(redis_url: str, models_dir: Path, tmp_path: Path) -> Iterator[Flask]:
    """The same with keys required (quotas and usage are per key)."""
    with in_process(redis_url, models_dir, tmp_path, require_api_key=True) as app:
        yield app


def settings_of(app: Flask) -> Settings:
    from api.services import services

    return services(app).settings


def reconciler(app: Flask) -> Reconciler:
    """A reconciler on the app's database and Redis, as a worker's heartbeat thread runs one."""
    from api.services import services

    shared = services(app)
    return Reconciler(shared.settings, shared.jobs.broker.celery, shared.jobs.broker.redis, "test-settle")


def settle(app: Flask) -> int:
    """One reconciler's settling pass; how many items it wrote."""
    return reconciler(app).settle()


def stored(app: Flask, job_id: str) -> dict[str, int]:
    """The job's items per state as the rows store them (not as they read)."""
    with sessions(settings_of(app))() as session:
        rows = session.execute(select(Item.state, func.count()).where(Item.job_id == job_id).group_by(Item.state))
        return {state: int(n) for state, n in rows}


def lines(client: FlaskClient, path: str, **headers: str) -> list[dict[str, Any]]:
    r = client.get(path, headers=headers, buffered=True)
    assert r.status_code == 200, r.data
    return [json.loads(line) for line in r.data.splitlines() if line.strip()]


def submit(client: FlaskClient, n: int = ITEMS, **headers: str) -> dict[str, Any]:
    body = {"model": MODEL, "kind": "generate", "options": {"num_predict": 4},
            "items": [{"custom_id": f"p{i}", "prompt": f"Say {i}."} for i in range(n)]}
    r = client.post("/api/jobs", json=body, headers=headers)
    assert r.status_code == 202, r.data
    return dict(r.get_json())


def job_items_gauge(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics", buffered=True).data.decode()
    return {s.labels["state"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "corral_job_items"}


def test_a_cancelled_jobs_unrun_items_read_as_cancelled_before_and_after_settling(own_app: Flask) -> None:
    app = own_app
    client = app.test_client()
    job = submit(client)
    cancelled = client.post(f"/api/jobs/{job['id']}/cancel").get_json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"] == 1.0
    assert cancelled["counts"] == {"total": ITEMS, "pending": 0, "running": 0, "succeeded": 0, "failed": 0,
                                   "cancelled": ITEMS}
    assert stored(app, job["id"]) == {"pending": ITEMS}  # the cancel wrote no item

    def readings() -> dict[str, Any]:
        page = client.get(f"/ui/jobs/{job['id']}", buffered=True).data.decode()
        return {
            "counts": client.get(f"/api/jobs/{job['id']}").get_json()["counts"],
            "lines": [(line["custom_id"], line["state"]) for line in lines(client, f"/api/jobs/{job['id']}/results")],
            "only cancelled": len(lines(client, f"/api/jobs/{job['id']}/results?state=cancelled")),
            "only pending": len(lines(client, f"/api/jobs/{job['id']}/results?state=pending")),
            "console": (f'id="count-cancelled">{ITEMS}<' in page, 'id="count-pending">0<' in page),
            "metrics": job_items_gauge(client),
            "listed": [j["counts"]["cancelled"] for j in client.get("/api/jobs?status=cancelled").get_json()["jobs"]],
        }

    before = readings()
    assert before["lines"] == [(f"p{i}", "cancelled") for i in range(ITEMS)]
    assert before["only cancelled"] == ITEMS and before["only pending"] == 0
    assert before["console"] == (True, True)
    assert before["metrics"]["cancelled"] == ITEMS and before["metrics"]["pending"] == 0
    assert before["listed"] == [ITEMS]
    assert settle(app) == ITEMS
    assert stored(app, job["id"]) == {"cancelled": ITEMS}
    assert readings() == before


def test_a_cancelled_openai_batchs_error_file_lists_every_unrun_request(own_app: Flask) -> None:
    app = own_app
    client = app.test_client()
    requests = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": MODEL, "prompt": f"Count to {i}.", "max_tokens": 4}} for i in range(ITEMS)]
    content = "".join(json.dumps(r) + "\n" for r in requests).encode()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")})
    assert upload.status_code == 200, upload.data
    batch = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).get_json()
    done = client.post(f"/v1/batches/{batch['id']}/cancel").get_json()
    assert done["status"] == "cancelled" and done["output_file_id"] is None
    assert done["request_counts"] == {"total": ITEMS, "completed": 0, "failed": 0}

    def error_file() -> list[tuple[str, str]]:
        file_id = client.get(f"/v1/batches/{batch['id']}").get_json()["error_file_id"]
        return [(line["custom_id"], line["error"]["code"]) for line in lines(client, f"/v1/files/{file_id}/content")]

    assert error_file() == [(f"r{i}", "batch_cancelled") for i in range(ITEMS)]
    reconciler(app).sweep()  # a worker's periodic sweep settles them
    assert stored(app, batch["id"]) == {"cancelled": ITEMS}
    assert error_file() == [(f"r{i}", "batch_cancelled") for i in range(ITEMS)]


def test_an_expired_openai_batchs_error_file_lists_every_unrun_request(own_app: Flask) -> None:
    app, client = own_app, own_app.test_client()
    requests = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": MODEL, "prompt": f"Count to {i}.", "max_tokens": 4}} for i in range(ITEMS)]
    content = "".join(json.dumps(r) + "\n" for r in requests).encode()
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(content), "in.jsonl")})
    batch = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).get_json()
    with sessions(settings_of(app))() as session:  # its window passes, and the reconciler's expiry comes
        session.execute(update(Job).where(Job.id == batch["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert transitions.expire_overdue(session) == [(batch["id"], session.get(Job, batch["id"]).model_digest)]
        session.commit()

    def read() -> tuple[str, list[str]]:
        view = client.get(f"/v1/batches/{batch['id']}").get_json()
        return view["status"], [line["error"]["code"] for line in
                                lines(client, f"/v1/files/{view['error_file_id']}/content")]

    assert read() == ("expired", ["batch_expired"] * ITEMS)
    assert stored(app, batch["id"]) == {"pending": ITEMS}
    assert settle(app) == ITEMS
    assert read() == ("expired", ["batch_expired"] * ITEMS)


def test_cancelled_items_leave_the_quota_count_in_usage_and_retry_runs_only_the_failed(keyed_app: Flask) -> None:
    app = keyed_app
    key, _ = KeyStore(settings_of(app)).create("twelve", limits=KeyLimits(max_queued_items=12))
    auth = {"Authorization": f"Bearer {key}"}
    client = app.test_client()
    first = submit(client, **auth)
    with sessions(settings_of(app))() as session:  # a worker ran the first chunk: one item failed, two succeeded
        chunk = session.scalar(select(Item.chunk_id).where(Item.job_id == first["id"], Item.seq == 0))
        assert chunk is not None and transitions.claim_chunk(session, chunk, "w", "a1") is not None
        ids = transitions.pending_items(session, chunk)
        transitions.claim_items(session, ids, "a1")
        for n, item_id in enumerate(ids):
            transitions.write_result(session, item_id, "a1", {"state": ItemState.FAILED, "error": "boom"} if n == 0
                                     else {"state": ItemState.SUCCEEDED, "output": {"response": "ok"}})
        transitions.close_chunk(session, chunk, "a1", first["id"])
        session.commit()
    ran = len(ids)
    refused = client.post("/api/jobs", headers=auth, json={"model": MODEL, "kind": "generate",
                                                           "items": [{"prompt": "x"}] * 6})
    assert refused.status_code == 429  # its 7 queued items and these 6 would be 13
    cancelled = client.post(f"/api/jobs/{first['id']}/cancel", headers=auth).get_json()
    assert cancelled["counts"]["cancelled"] == ITEMS - ran
    second = submit(client, **auth)  # the cancelled items no longer count as queued
    usage = client.get("/api/usage", headers=auth).get_json()["usage"]
    assert [row["batch_items"] for row in usage] == [ITEMS]  # the ones that ran and the ones cancelled
    retried = client.post(f"/api/jobs/{first['id']}/retry", headers=auth).get_json()
    assert retried["status"] == "queued"
    assert retried["counts"] == {"total": ITEMS, "pending": 1, "running": 0, "succeeded": ran - 1, "failed": 0,
                                 "cancelled": ITEMS - ran}
    assert [line["state"] for line in lines(client, f"/api/jobs/{first['id']}/results", **auth)].count("pending") == 1
    assert stored(app, first["id"])["cancelled"] == ITEMS - ran  # written when the job reopened
    assert client.post(f"/api/jobs/{second['id']}/cancel", headers=auth).get_json()["counts"]["cancelled"] == ITEMS
    assert [row["batch_items"] for row in client.get("/api/usage", headers=auth).get_json()["usage"]] == [2 * ITEMS - 1]


def test_a_cancelled_message_batch_whose_worker_died_ends_at_the_next_sweep(own_app: Flask) -> None:
    """A cancel leaves a running item to its worker; a worker killed then (no heartbeat) left the item running for
    good, and the batch ``canceling``: its results and its delete refused for ever.  The reconciler's sweep
    cancels such items, and a late write of the dead attempt is refused."""
    app, client = own_app, own_app.test_client()
    params = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    r = client.post("/v1/messages/batches", json={"requests": [{"custom_id": f"m{i}", "params": params}
                                                               for i in range(ITEMS)]})
    assert r.status_code == 200, r.data
    batch = r.get_json()["id"]
    with sessions(settings_of(app))() as session:  # a worker, killed later, had begun the first chunk
        chunk = session.scalar(select(Item.chunk_id).where(Item.job_id == batch, Item.seq == 0))
        assert chunk is not None and transitions.claim_chunk(session, chunk, "killed-worker", "a1") is not None
        running = transitions.claim_items(session, transitions.pending_items(session, chunk), "a1")
        session.commit()
    view = client.post(f"/v1/messages/batches/{batch}/cancel").get_json()
    assert view["processing_status"] == "canceling" and view["results_url"] is None
    assert client.delete(f"/v1/messages/batches/{batch}").status_code == 400
    assert client.get(f"/v1/messages/batches/{batch}/results").status_code == 400
    assert client.get(f"/api/jobs/{batch}").get_json()["counts"]["running"] == len(running)

    reconciler(app).sweep()  # no heartbeat of killed-worker's in this Redis: its items are cancelled
    view = client.get(f"/v1/messages/batches/{batch}").get_json()
    assert view["processing_status"] == "ended" and view["ended_at"] is not None
    assert view["request_counts"] == {"processing": 0, "succeeded": 0, "errored": 0, "canceled": ITEMS, "expired": 0}
    counts = client.get(f"/api/jobs/{batch}").get_json()["counts"]
    assert counts["running"] == 0 and counts["cancelled"] == ITEMS
    with sessions(settings_of(app))() as session:  # the killed worker was only stalled: its late results drop
        assert not transitions.write_result(session, running[0][0], "a1", {"state": ItemState.SUCCEEDED})
        session.commit()
    results = lines(client, f"/v1/messages/batches/{batch}/results")
    assert [(line["custom_id"], line["result"]["type"]) for line in results] == [(f"m{i}", "canceled")
                                                                                 for i in range(ITEMS)]
    assert stored(app, batch) == {"cancelled": ITEMS}  # the sweep's settling wrote the unrun ones too
    assert client.delete(f"/v1/messages/batches/{batch}").status_code == 200
