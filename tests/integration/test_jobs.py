"""Batch jobs through the real API, worker and database: submit, poll, results, control, bad input, priority."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import httpx
import pytest

from harness.stack import wait_for
from tests.helpers import MODEL, results, submit, wait_done

FAST = {"num_predict": 6, "temperature": 0, "seed": 1}


def test_generate_job_runs_every_item_once_in_input_order(base_url: str) -> None:
    prompts = [f"Say the number {i}." for i in range(7)]
    job = submit(
        base_url, kind="generate", options=FAST, metadata={"run": "nightly"},
        items=[{"custom_id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)],
    )
    assert job["status"] == "queued" and job["counts"]["total"] == 7 and job["metadata"] == {"run": "nightly"}
    done = wait_done(base_url, job["id"])
    assert done["status"] == "completed"
    assert done["counts"] == {"total": 7, "pending": 0, "running": 0, "succeeded": 7, "failed": 0, "cancelled": 0}
    assert done["progress"] == 1.0 and done["tokens"]["completion"] == 7 * 6
    assert done["started_at"] and done["finished_at"]
    lines = results(base_url, job["id"])
    assert [line["custom_id"] for line in lines] == [f"p{i}" for i in range(7)]
    for line in lines:
        assert line["state"] == "succeeded" and line["error"] is None
        body = line["response"]
        assert body["done"] is True and body["model"] == MODEL and body["eval_count"] == 6 and body["response"]
    # A batch item gives the same text as the same sync request (greedy decoding).
    sync = httpx.post(
        base_url + "/api/generate",
        json={"model": MODEL, "prompt": prompts[3], "stream": False, "options": FAST},
        timeout=60,
    ).json()
    assert lines[3]["response"]["response"] == sync["response"]
    page = results(base_url, job["id"], offset=2, limit=3)
    assert [line["custom_id"] for line in page] == ["p2", "p3", "p4"]


def test_jsonl_chat_upload_and_listing(base_url: str) -> None:
    lines = [json.dumps({"custom_id": f"c{i}", "messages": [{"role": "user", "content": f"Hi {i}"}]}) for i in range(3)]
    r = httpx.post(
        base_url + "/api/jobs",
        params={"kind": "chat", "model": MODEL, "options": json.dumps(FAST), "chunk_size": 2},
        content=("\n".join(lines) + "\n").encode(),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "chat" and job["chunk_size"] == 2
    wait_done(base_url, job["id"])
    out = results(base_url, job["id"])
    assert [o["response"]["message"]["role"] for o in out] == ["assistant"] * 3
    completed = httpx.get(base_url + "/api/jobs", params={"status": "completed", "limit": 100}).json()["jobs"]
    assert job["id"] in [j["id"] for j in completed]
    r = httpx.get(base_url + "/api/jobs", params={"status": "bogus"})
    assert r.status_code == 400


def test_embed_job_stores_normalized_vectors(base_url: str) -> None:
    job = submit(base_url, kind="embed", items=[{"input": "alpha"}, {"custom_id": "two", "input": ["beta", "gamma"]}])
    wait_done(base_url, job["id"])
    first, second = results(base_url, job["id"])
    assert len(first["response"]["embeddings"]) == 1 and len(second["response"]["embeddings"]) == 2
    vec = second["response"]["embeddings"][1]
    assert math.isclose(sum(x * x for x in vec), 1.0, rel_tol=1e-4)
    sync = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": "gamma"}, timeout=60).json()
    assert vec == pytest.approx(sync["embeddings"][0], abs=1e-5)


def test_per_item_failures_are_recorded_and_retry_reruns_only_them(base_url: str) -> None:
    too_long = "word " * 5000
    job = submit(
        base_url, kind="embed",
        items=[{"custom_id": "ok", "input": "short"}, {"custom_id": "bad", "input": too_long, "truncate": False}],
    )
    done = wait_done(base_url, job["id"])
    assert done["status"] == "completed" and done["counts"]["failed"] == 1 and done["counts"]["succeeded"] == 1
    failed = results(base_url, job["id"], state="failed")
    assert [f["custom_id"] for f in failed] == ["bad"]
    assert failed[0]["error"] == "the input length exceeds the context length"
    retried = httpx.post(f"{base_url}/api/jobs/{job['id']}/retry").json()
    assert retried["status"] == "queued" and retried["counts"]["pending"] == 1
    again = wait_done(base_url, job["id"])
    assert again["counts"]["failed"] == 1 and again["counts"]["succeeded"] == 1
    ok = results(base_url, job["id"], state="succeeded")
    assert [o["custom_id"] for o in ok] == ["ok"]


def test_cancel_stops_a_job_and_delete_removes_it(base_url: str) -> None:
    job = submit(
        base_url, kind="generate", chunk_size=2, options={"num_predict": 40},
        items=[{"prompt": f"Tell me about topic {i}."} for i in range(20)],
    )
    cancelled = httpx.post(f"{base_url}/api/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["pending"] == 0
    # the items that were running stop between tokens; wait for that, however long a busy machine takes
    state: dict[str, Any] = {}

    def settled() -> bool:
        state.update(httpx.get(f"{base_url}/api/jobs/{job['id']}").json())
        return state["counts"]["running"] == 0

    wait_for(settled, 120, "the cancelled job's running items to stop", interval=0.2)
    assert state["status"] == "cancelled"
    assert state["counts"]["cancelled"] >= 15 and state["counts"]["pending"] == 0
    assert httpx.delete(f"{base_url}/api/jobs/{job['id']}").json()["deleted"] is True
    r = httpx.get(f"{base_url}/api/jobs/{job['id']}")
    assert (r.status_code, r.json()) == (404, {"error": f"job '{job['id']}' not found"})




def test_queue_shows_waiting_chunks(base_url: str) -> None:
    job = submit(base_url, kind="generate", chunk_size=1, options={"num_predict": 20},
                 items=[{"prompt": f"Story {i}"} for i in range(6)])
    view = httpx.get(base_url + "/api/queue").json()
    entry = next(m for m in view["models"] if m["model"].startswith("smollm2"))
    assert entry["batch_chunks_queued"] + entry["batch_chunks_running"] >= 4
    assert view["workers"] and view["workers"][0]["models"]
    httpx.post(f"{base_url}/api/jobs/{job['id']}/cancel")


def test_chat_goes_ahead_of_a_running_batch_job(base_url: str) -> None:
    """With a 24-chunk job queued, a chat's first token comes before more than the chunks already running end.

    Measured in the job's own progress, not in seconds, so a slow or busy machine cannot fail it: the worker runs
    at most two chunks (of two items) at a time, so a chat that waited for the queue to drain would see dozens
    of items finish first.
    """
    job = submit(
        base_url, kind="generate", chunk_size=2, options={"num_predict": 30},
        items=[{"prompt": f"Write about {i}."} for i in range(48)],
    )

    def finished() -> int:
        counts = httpx.get(f"{base_url}/api/jobs/{job['id']}").json()["counts"]
        return int(counts["succeeded"] + counts["failed"])

    wait_for(lambda: finished() >= 2, 120, "the job to start")
    before = finished()
    at_first_token: list[int] = []

    def chat() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 5}}
        with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=300) as r:
            for _ in r.iter_lines():
                at_first_token.append(finished())
                break

    thread = threading.Thread(target=chat)
    thread.start()
    thread.join(300)
    assert at_first_token, "the chat got no token"
    # the chunks running when the chat arrived (two, of two items each) may end first, and the next two while the
    # progress is read; a chat that queued behind the job would see up to 46
    assert at_first_token[0] - before <= 8, f"{at_first_token[0] - before} batch items finished before the chat's first token"
    httpx.post(f"{base_url}/api/jobs/{job['id']}/cancel")
