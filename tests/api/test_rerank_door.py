"""Rerank bodies checked at the door, in each route family's own error shape, before anything is queued."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from corral.rerank import MAX_DOCUMENTS
from tests.helpers import EMBED_MODEL, MODEL

DOCS = ["a", "b"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": "q", "documents": DOCS}, "model is required"),
        ({"model": EMBED_MODEL, "documents": DOCS}, '"query" must be provided'),
        ({"model": EMBED_MODEL, "query": 5, "documents": DOCS}, '"query" must be a string'),
        ({"model": EMBED_MODEL, "query": "q"}, '"documents" must be a non-empty string array'),
        ({"model": EMBED_MODEL, "query": "q", "documents": []}, '"documents" must be a non-empty string array'),
        ({"model": EMBED_MODEL, "query": "q", "documents": ["a", 3]}, '"documents" must be a non-empty string array'),
        ({"model": EMBED_MODEL, "query": "q", "documents": [{"title": "x"}]},
         '"documents" must be a non-empty string array'),
        ({"model": EMBED_MODEL, "query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)},
         f"too many documents: {MAX_DOCUMENTS + 1}; at most {MAX_DOCUMENTS} per request (use a rerank job for more)"),
        ({"model": EMBED_MODEL, "query": "q", "documents": DOCS, "top_n": -1}, "invalid value for 'top_n'"),
        ({"model": EMBED_MODEL, "query": "q", "documents": DOCS, "top_n": "2"}, "invalid value for 'top_n'"),
        ({"model": EMBED_MODEL, "query": "q", "documents": DOCS},
         "all-minilm:latest is not a reranker: it has no classifier head"),
        ({"model": MODEL, "query": "q", "documents": DOCS}, "smollm2:latest is not a reranker"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"])
def test_llama_server_shape_errors(client: FlaskClient, path: str, body: dict[str, Any], message: str) -> None:
    resp = client.post(path, json=body)
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(message)


def test_unknown_model_is_a_404(client: FlaskClient) -> None:
    resp = client.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": DOCS})
    assert resp.status_code == 404
    assert resp.get_json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"query": "q", "documents": DOCS}, 400, "model is required"),
        ({"model": EMBED_MODEL, "query": "q", "documents": DOCS, "max_tokens_per_doc": 0}, 400,
         "invalid value for 'max_tokens_per_doc'"),
        ({"model": "nope", "query": "q", "documents": DOCS}, 404, "model 'nope' not found"),
        ({"model": EMBED_MODEL, "query": "q", "documents": DOCS}, 400, "all-minilm:latest is not a reranker"),
    ],
)
def test_cohere_shape_errors(client: FlaskClient, body: dict[str, Any], status: int, message: str) -> None:
    resp = client.post("/v2/rerank", json=body)
    assert resp.status_code == status
    assert set(resp.get_json()) == {"message"}
    assert resp.get_json()["message"].startswith(message)


def test_not_json_is_a_400_in_each_shape(client: FlaskClient) -> None:
    assert client.post("/v1/rerank", data=b"{").status_code == 400
    resp = client.post("/v2/rerank", data=b"[1]")
    assert resp.status_code == 400 and "message" in resp.get_json()
