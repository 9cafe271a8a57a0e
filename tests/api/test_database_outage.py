"""The job database out of reach (issue #38): each API family's job routes answer a 503 with ``Retry-After`` in
its own error shape, never a 500, while routes that need no SQL go on.  The database is a PostgreSQL URL on a
loopback port nothing listens on, so every connect is refused as it is while a server restarts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from corral.settings import Settings
from harness.processes import free_port
from jobs.db import engine_for

pytest.importorskip("psycopg")


@pytest.fixture()
def down(settings: Settings) -> Iterator[FlaskClient]:
    from api import create_app

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    try:
        yield create_app(settings.model_copy(update={"database_url": url})).test_client()
    finally:
        engine_for(url).dispose()


def retry_after(resp) -> int:  # type: ignore[no-untyped-def]
    assert resp.status_code == 503, (resp.status_code, resp.get_data(as_text=True))
    return int(resp.headers["Retry-After"])


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/jobs/job_x"), ("GET", "/api/jobs"), ("POST", "/api/jobs/job_x/cancel"),
])
def test_ollama_job_routes_answer_503_in_ollamas_shape(down: FlaskClient, method: str, path: str) -> None:
    resp = down.open(path, method=method)
    assert retry_after(resp) >= 1
    body = resp.get_json()
    assert set(body) == {"error"} and "database is unreachable" in body["error"], body
    assert "127.0.0.1" not in body["error"]  # no address of the database in a client's error


def test_a_job_submission_answers_503_and_stores_nothing(down: FlaskClient) -> None:
    resp = down.post("/api/jobs", json={"kind": "generate", "model": "smollm2", "items": [{"prompt": "Hi."}]})
    assert retry_after(resp) >= 1 and "database" in resp.get_json()["error"]


def test_openai_batch_routes_answer_503_in_openais_shape(down: FlaskClient) -> None:
    for resp in (down.get("/v1/batches/batch_x"), down.get("/v1/batches"), down.get("/v1/files")):
        assert retry_after(resp) >= 1
        error = resp.get_json()["error"]
        assert error["code"] == "database_unavailable" and error["type"] == "api_error", error
        assert "database is unreachable" in error["message"]


def test_anthropic_batch_routes_answer_503_in_anthropics_shape(down: FlaskClient) -> None:
    resp = down.get("/v1/messages/batches/msgbatch_x", headers={"anthropic-version": "2023-06-01"})
    assert retry_after(resp) >= 1
    body = resp.get_json()
    assert body["type"] == "error" and "database is unreachable" in body["error"]["message"], body


def test_routes_without_sql_answer_as_usual(down: FlaskClient) -> None:
    assert down.get("/").status_code == 200
    assert down.get("/api/tags").status_code == 200
    assert down.get("/api/version").status_code == 200


def test_a_job_stored_before_the_database_fails_is_answered_202_once(
        client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes away between the commit that stores a job and the dispatch after it: the client gets its
    202 (a 503 would make its retry a second job), and the job is stored once, to be dispatched by the
    reconciler.  The fault is injected where it lands, in the dispatcher's first statement."""
    import psycopg
    from sqlalchemy import func, select
    from sqlalchemy.exc import OperationalError

    from jobs.db import sessions
    from jobs.models import Job
    from jobs.service import JobService

    def gone(self: JobService, model_digest: str) -> int:
        raise OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection unexpectedly"))

    monkeypatch.setattr(JobService, "send_next", gone)
    with sessions(settings)() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    resp = client.post("/api/jobs", json={"kind": "generate", "model": "smollm2",
                                          "items": [{"custom_id": "a", "prompt": "hi"}]})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["status"] == "queued" and job["counts"]["total"] == 1
    with sessions(settings)() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == (before or 0) + 1
        assert session.get(Job, job["id"]) is not None


def test_every_pooled_connection_busy_answers_503_not_500(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose connections all stay busy past its wait (SQLAlchemy's TimeoutError, no DBAPI error) is the
    database out of reach for that request: each family's 503 with ``Retry-After``."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from api import create_app
    from jobs import batches, service

    def full(*_: object, **__: object) -> None:
        raise PoolTimeout("QueuePool limit of size 5 overflow 5 reached, connection timed out, timeout 5.00")

    monkeypatch.setattr(service, "poll", full)
    monkeypatch.setattr(batches, "poll", full)
    client = create_app(settings).test_client()
    resp = client.get("/api/jobs/job_x")
    assert retry_after(resp) >= 1 and "every connection busy" in resp.get_json()["error"]
    resp = client.get("/v1/batches/batch_x")
    assert retry_after(resp) >= 1 and resp.get_json()["error"]["code"] == "database_unavailable"
