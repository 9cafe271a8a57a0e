"""``/v1/responses`` background responses and chains, on the in-process app (no worker, no Redis): the job's
rows are written here as a worker would write them, so each test sets up the moment it is about (a spent
budget, a save that fails, a cancel while the item runs, a chain onto a job not read yet, an expiry).  The same
flows against real processes: tests/integration/test_responses.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update

import jobs.responses
from api import create_app
from api.governance import Governor
from api.inference import Inference
from corral.errors import BadRequest, RateLimited
from corral.settings import Settings
from jobs import transitions
from jobs.db import sessions
from jobs.models import Item, ItemState, Job, JobStatus, StoredResponse, utcnow
from jobs.responses import ResponseStore, purge
from jobs.service import JobService
from tests.api.test_responses_errors import openai_error
from tests.helpers import MODEL
from tests.unit.test_stopping import Recorder

REPLY = {"model": MODEL, "message": {"role": "assistant", "content": "ANSWER-42"}, "done": True,
         "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2}


@pytest.fixture()
def queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """A submit commits the job and does not reach Redis: its chunk waits as if no worker had taken it."""
    monkeypatch.setattr(JobService, "send_next", lambda self, digest: 0)


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, Any]]]:
    """The native messages a sync request would send, and a 400 in place of the worker."""
    seen: list[list[dict[str, Any]]] = []

    def capture(self: Inference, record: Any, name: str, kind: str, **fields: Any) -> Any:
        seen.append(fields["messages"])
        raise BadRequest("stopped before the worker (test)")

    monkeypatch.setattr(Inference, "request", capture)
    return seen


def background(client: FlaskClient, text: str = "hi") -> str:
    r = client.post("/v1/responses", json={"model": MODEL, "input": text, "background": True})
    assert r.status_code == 200 and r.get_json()["status"] == "queued", r.get_data(as_text=True)
    return str(r.get_json()["id"])


def set_item(settings: Settings, job_id: str, **values: Any) -> None:
    with sessions(settings)() as session:
        session.execute(update(Item).where(Item.job_id == job_id).values(**values))
        session.commit()


def job_exists(settings: Settings, job_id: str) -> bool:
    with sessions(settings)() as session:
        return session.get(Job, job_id) is not None


def row_exists(settings: Settings, ident: str) -> bool:
    with sessions(settings)() as session:
        return session.get(StoredResponse, ident) is not None


def test_a_spent_budget_queues_no_background_response(client: FlaskClient, settings: Settings, queued: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def spent(self: Governor, who: Any) -> None:
        raise RateLimited("this key's token budget is spent", retry_after=60)

    monkeypatch.setattr(Governor, "check_budget", spent)
    before = _counts(settings)
    status, error = openai_error(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True}))
    assert (status, error["message"]) == (429, "this key's token budget is spent")
    assert _counts(settings) == before  # no job, no row


def _counts(settings: Settings) -> tuple[int, int]:
    with sessions(settings)() as session:
        return len(session.scalars(select(Job.id)).all()), len(session.scalars(select(StoredResponse.id)).all())


def test_a_background_response_whose_row_cannot_be_saved_runs_nothing(
        client: FlaskClient, settings: Settings, queued: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: ResponseStore, body: dict[str, Any], items: list[dict[str, Any]], *, owner: str | None) -> None:
        raise RuntimeError("database gone (test)")

    before = _counts(settings)
    monkeypatch.setattr(ResponseStore, "save", broken)
    status, _ = openai_error(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True}))
    assert status == 500
    assert _counts(settings) == before  # no job runs (nor bills) behind the 500


def test_a_background_response_whose_submit_fails_leaves_no_row(client: FlaskClient, settings: Settings,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: JobService, **fields: Any) -> dict[str, Any]:
        raise RateLimited("the queue is full (test)", retry_after=5)

    monkeypatch.setattr(JobService, "submit", full)
    before = _counts(settings)
    status, _ = openai_error(client.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True}))
    assert status == 429 and _counts(settings) == before


def test_a_chain_onto_a_background_response_takes_its_reply(client: FlaskClient, settings: Settings, queued: None,
                                                            sent: list[list[dict[str, Any]]]) -> None:
    rid = background(client, "first question")
    status, error = openai_error(client.post("/v1/responses", json={
        "model": MODEL, "input": "and then?", "previous_response_id": rid}))
    assert (status, error["param"]) == (400, "previous_response_id")
    assert error["message"] == (f"Previous response with id '{rid}' is still queued: wait until it has finished "
                                "to continue it.")
    set_item(settings, rid, state=ItemState.SUCCEEDED, claim=None, output=REPLY)
    client.post("/v1/responses", json={"model": MODEL, "input": "and then?", "previous_response_id": rid})
    assert [(m["role"], m["content"]) for m in sent[-1]] == [
        ("user", "first question"), ("assistant", "ANSWER-42"), ("user", "and then?")]  # no GET needed first
    assert client.get(f"/v1/responses/{rid}").get_json()["status"] == "completed"


def test_a_chains_conversation_is_bounded(settings: Settings, sent: list[list[dict[str, Any]]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    small = settings.model_copy(update={"max_body": 10_000})
    client = create_app(small).test_client()
    store, prev = ResponseStore(small), None
    for i in range(5):  # 5 turns of 9 kB: 45 kB of history, past 4 x CORRAL_MAX_BODY
        ident = f"resp_bounded_{i}"
        store.save({"id": ident, "status": "completed", "model": MODEL, "output": [], "created_at": 1,
                    "previous_response_id": prev},
                   [{"id": f"msg_{i}", "type": "message", "role": "user",
                     "content": [{"type": "input_text", "text": "x" * 9000}]}], owner=None)
        prev = ident
    ask = {"model": MODEL, "input": "hi", "previous_response_id": prev}
    status, error = openai_error(client.post("/v1/responses", json=ask))
    assert (status, error["param"]) == (400, "previous_response_id") and "40000 bytes" in error["message"]
    assert sent == []  # refused while walking the chain, before any messages were built
    client.post("/v1/responses", json={**ask, "previous_response_id": "resp_bounded_2"})  # 3 turns fit
    assert len(sent) == 1 and len(json.dumps(sent[0])) > 27_000
    monkeypatch.setattr(jobs.responses, "MAX_INPUT_ITEMS", 2)
    status, error = openai_error(client.post("/v1/responses", json={**ask, "previous_response_id": "resp_bounded_2"}))
    assert status == 400 and "more than 2 items" in error["message"]


def test_a_cancel_while_the_item_runs_reads_as_the_item_ends(client: FlaskClient, settings: Settings,
                                                             queued: None) -> None:
    rid = background(client)
    set_item(settings, rid, state=ItemState.RUNNING, claim="attempt-1")
    with sessions(settings)() as session:  # the cancel's SQL change (the Redis flag would stop it between tokens)
        assert transitions.stop_job(session, rid, JobStatus.CANCELLED)
        session.commit()
    assert client.get(f"/v1/responses/{rid}").get_json()["status"] == "in_progress"  # not saved as cancelled
    set_item(settings, rid, state=ItemState.SUCCEEDED, claim=None, output=REPLY)  # it finished first
    done = client.get(f"/v1/responses/{rid}").get_json()
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "ANSWER-42"

    other = background(client)
    set_item(settings, other, state=ItemState.RUNNING, claim="attempt-1")
    with sessions(settings)() as session:
        transitions.stop_job(session, other, JobStatus.CANCELLED)
        session.commit()
    set_item(settings, other, state=ItemState.CANCELLED, claim=None)  # the flag stopped it
    assert client.get(f"/v1/responses/{other}").get_json()["status"] == "cancelled"


def test_expiry_deletes_a_background_responses_job(client: FlaskClient, settings: Settings, queued: None) -> None:
    rid = background(client)
    with sessions(settings)() as session:
        session.execute(update(StoredResponse).where(StoredResponse.id == rid)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    with sessions(settings)() as session:
        redis = Recorder(session)
        assert purge(session, redis) >= 1
        assert "hset" in redis.calls and "eval" in redis.calls  # stopped as a delete stops it: its messages go
    assert not row_exists(settings, rid) and not job_exists(settings, rid)


def test_a_sync_answer_is_sent_when_its_row_cannot_be_saved(client: FlaskClient, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    class Job:
        request_id = "req-test"

    def chunks(self: Inference, job: Any, kind: str) -> Iterator[dict[str, Any]]:
        yield REPLY

    def broken(self: ResponseStore, body: dict[str, Any], items: list[dict[str, Any]], *, owner: str | None) -> None:
        raise RuntimeError("database gone (test)")

    monkeypatch.setattr(Inference, "request", lambda self, *args, **fields: Job())
    monkeypatch.setattr(Inference, "generation", chunks)
    monkeypatch.setattr(ResponseStore, "save", broken)
    r = client.post("/v1/responses", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 200 and r.get_json()["output"][0]["content"][0]["text"] == "ANSWER-42"
    assert "could not keep response" in caplog.text
