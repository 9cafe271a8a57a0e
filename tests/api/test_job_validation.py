"""Job and batch bodies checked at the door, on the in-process app: a bad body or line is a 400 (or 413) that
names the line, and nothing is stored.  Nothing here reaches a worker, or Redis: submission enqueues only after
every line passed."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.helpers import MODEL


def job_count(client: FlaskClient) -> int:
    return len(client.get("/api/jobs", query_string={"limit": 1000}).get_json()["jobs"])


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"kind": "generate", "model": "nope", "items": [{"prompt": "x"}]}, 404, "model 'nope' not found"),
        ({"kind": "generate", "model": MODEL, "items": []}, 400, "no items: the input is empty"),
        ({"kind": "generate", "model": MODEL, "items": [{"prompt": "a"}, {"messages": []}]}, 400,
         'line 2: a generate item needs a non-empty "prompt" string'),
        ({"kind": "chat", "model": MODEL, "items": [{"messages": [{"role": "user", "content": "x"}]}, 5]}, 400,
         "line 2: expected a JSON object, got int"),
        ({"kind": "generate", "model": MODEL, "items": [{"custom_id": "a", "prompt": "x"}, {"custom_id": "a", "prompt": "y"}]},
         400, 'line 2: duplicate custom_id "a" (also on line 1)'),
        # options are checked per line even when an earlier line's equal-looking ones passed (True == 1)
        ({"model": MODEL, "items": [{"prompt": "a", "options": {"num_predict": 1}},
                                    {"prompt": "b", "options": {"num_predict": True}}]},
         400, 'line 2: option "num_predict" must be of type integer'),
        ({"kind": "sing", "model": MODEL, "items": [{"prompt": "x"}]}, 400,
         "kind must be one of generate, chat, embed, rerank, not 'sing'"),
        # every field the worker reads is typed at the door, so no stored line can make the worker raise
        ({"model": MODEL, "items": [{"prompt": "b", "system": 1}]}, 400, "line 1: system: Input should be a valid string"),
        ({"model": MODEL, "items": [{"prompt": "b", "format": "xml"}]}, 400,
         'line 1: invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'),
        ({"model": MODEL, "items": [{"prompt": "b", "options": {"top_k": "many"}}]}, 400,
         'line 1: option "top_k" must be of type integer'),
        ({"kind": "embed", "model": "all-minilm", "items": [{"input": "a", "dimensions": 0}]}, 400,
         "line 1: dimensions: Input should be greater than or equal to 1"),
        ({"model": MODEL, "items": [{"prompt": "a"}], "chunk_size": "big"}, 400,
         "chunk_size: Input should be a valid integer, unable to parse string as an integer"),
        ({"model": MODEL, "items": [{"prompt": "a"}], "metadata": [1]}, 400, "metadata: Input should be a valid dictionary"),
        ({"model": MODEL, "items": {"prompt": "a"}}, 400, "items: Input should be a valid list"),
        ({"model": MODEL}, 400, "items is required"),
        ({"model": MODEL, "items": [{"prompt": "What is this?", "images": ["iVBORw0KGgo="]}]}, 400,
         "item 1: smollm2 does not support vision: the item has images"),
        ({"kind": "chat", "model": MODEL, "items": [{"messages": [{"role": "user", "content": "?", "images": ["iVBO"]}]}]},
         400, "item 1: smollm2 does not support vision: the item has images"),
        ({"model": MODEL, "items": [{"prompt": "What is this?", "images": [7]}]}, 400,
         "line 1: images must be a list of base64 strings"),
    ],
)
def test_bad_job_input_is_rejected_and_creates_nothing(
    client: FlaskClient, body: dict[str, Any], status: int, message: str
) -> None:
    before = job_count(client)
    r = client.post("/api/jobs", json=body)
    assert (r.status_code, r.get_json()) == (status, {"error": message})
    assert job_count(client) == before


def test_bad_jsonl_lines_name_the_line(client: FlaskClient) -> None:
    before = job_count(client)
    headers = {"Content-Type": "application/x-ndjson"}
    params = {"kind": "generate", "model": MODEL}
    r = client.post("/api/jobs", query_string=params, headers=headers, data=b'{"prompt": "a"}\n{not json\n')
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 2: not valid JSON")
    r = client.post("/api/jobs", query_string=params, headers=headers, data=b"")
    assert (r.status_code, r.get_json()) == (400, {"error": "no items: the input is empty"})
    huge = b'{"prompt": "a"}\n{"prompt": "' + b"x" * (10 << 20) + b'"}\n'
    r = client.post("/api/jobs", query_string=params, headers=headers, data=huge)
    assert (r.status_code, r.get_json()) == (413, {"error": "line 2: longer than 1048576 bytes"})
    assert job_count(client) == before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": "file-x", "endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
        ({"input_file_id": "file-x", "endpoint": "/v1/completions", "completion_window": "24h", "metadata": {"a": 1}},
         "metadata.a"),
    ],
)
def test_bad_batch_bodies_name_their_field(client: FlaskClient, body: dict[str, Any], param: str) -> None:
    r = client.post("/v1/batches", json=body)
    assert r.status_code == 400
    error = r.get_json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_a_custom_id_repeated_far_apart_is_refused_by_the_database(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past SEEN_IDS lines the upload forgets the ids it saw (memory stays flat); the unique index catches it."""
    import jobs.ingest

    monkeypatch.setattr(jobs.ingest, "SEEN_IDS", 2)
    before = len(client.get("/api/jobs?limit=1000").get_json()["jobs"])
    items = [{"custom_id": cid, "prompt": "x"} for cid in ("a", "b", "c", "d", "a")]
    r = client.post("/api/jobs", json={"model": MODEL, "items": items})
    assert r.status_code == 400 and r.get_json()["error"].startswith("duplicate custom_id: every line's custom_id")
    assert len(client.get("/api/jobs?limit=1000").get_json()["jobs"]) == before  # nothing stored


@pytest.mark.parametrize("last, error", [
    ({"custom_id": "k", "prompt": ""}, "line 11: "),  # refused by the parser, after 2 windows went to the database
    ({"custom_id": "a", "prompt": "x"}, "duplicate custom_id: every line's custom_id"),  # by the database
], ids=["bad line", "repeated id"])
def test_a_line_refused_after_windows_were_written_stores_nothing(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, last: dict[str, Any], error: str
) -> None:
    """The windows already written (on PostgreSQL, into a COPY still open) go with the refused upload, and the
    database connection is left fit for the next request."""
    import jobs.grouping
    import jobs.ingest

    monkeypatch.setattr(jobs.grouping, "WINDOW", 4)
    monkeypatch.setattr(jobs.ingest, "SEEN_IDS", 2)
    before = len(client.get("/api/jobs?limit=1000").get_json()["jobs"])
    items = [{"custom_id": cid, "prompt": f"x {cid}"} for cid in "abcdefghij"] + [last]
    for _ in range(2):  # the second time on connections the first one returned to the pool
        r = client.post("/api/jobs", json={"model": MODEL, "chunk_size": 2, "items": items})
        assert r.status_code == 400 and r.get_json()["error"].startswith(error), r.get_json()
        assert len(client.get("/api/jobs?limit=1000").get_json()["jobs"]) == before
