"""Rerank on the session's real worker, with the tiny cross-encoder created from a GGUF (the ``reranker``
fixture): an interactive request's scores are the numpy reference's for the same pairs, a document too long for
the context is refused when asked not to cut it, and afterwards the same worker still embeds and chats as before
(rank pooling never leaks into another model's context)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import MODEL, results, submit, wait_done
from tests.rerank_reference import ReferenceCrossEncoder

QUERY = "where is the eiffel tower"
DOCUMENTS = [
    "the eiffel tower is in paris, the capital of france",
    "berlin is the capital of germany",
    "a famous tower was built in the year 1889",
    "football [SEP] game",  # the literal [SEP] stays text
]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "stream": False,
        "options": {"temperature": 0, "num_predict": 8}}


def post(base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=120)


def reference_scores(path: Path) -> tuple[list[float], int]:
    """The reference's scores of [CLS] query [SEP] document [SEP], tokenized by llama.cpp's own tokenizer as
    plain text (special tokens not parsed), and the pairs' tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        def text(value: str) -> list[int]:
            return list(llm.tokenize(value.encode(), add_bos=False, special=False))

        cls, sep = llm.token_bos(), llm.token_eos()
        pairs = [[cls, *text(QUERY), sep, *text(doc), sep] for doc in DOCUMENTS]
    finally:
        llm.close()
    return ReferenceCrossEncoder(path).scores(pairs), sum(len(p) for p in pairs)


def test_rerank_scores_are_the_networks_and_leave_embedding_and_chat_alone(
    base_url: str, reranker: tuple[str, Path]
) -> None:
    name, path = reranker
    embed = {"model": "all-minilm", "input": ["the eiffel tower is in paris"]}
    embedded = post(base_url, "/api/embed", embed).json()["embeddings"]
    said = post(base_url, "/api/chat", CHAT).json()["message"]["content"]

    r = post(base_url, "/v1/rerank", {"model": name, "query": QUERY, "documents": DOCUMENTS})
    assert r.status_code == 200, r.text
    reply = r.json()
    got = {result["index"]: result["relevance_score"] for result in reply["results"]}
    expected, tokens = reference_scores(path)
    assert max(abs(got[i] - expected[i]) for i in range(len(DOCUMENTS))) < 1e-3
    assert [result["index"] for result in reply["results"]] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert reply["usage"]["prompt_tokens"] == tokens

    long_document = " ".join(["the tower is in paris"] * 60)
    r = post(base_url, "/v1/rerank", {"model": name, "query": QUERY, "documents": [long_document], "truncate": False})
    assert r.status_code == 400 and "truncate is false" in r.json()["error"]["message"], r.text
    r = post(base_url, "/v1/rerank", {"model": name, "query": QUERY, "documents": [long_document]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 128  # cut to the context

    # the reranker does not embed (its head is no embedding), and the embedding model does not rerank
    r = post(base_url, "/api/embed", {"model": name, "input": ["paris"]})
    assert r.status_code == 400 and "is a reranker" in r.json()["error"], r.text
    r = post(base_url, "/v1/rerank", {"model": "all-minilm", "query": QUERY, "documents": DOCUMENTS})
    assert r.status_code == 400 and "not a reranker" in r.json()["error"]["message"], r.text

    # the same worker, after rank pooling: the same vectors, the same greedy reply
    again = post(base_url, "/api/embed", embed).json()["embeddings"]
    assert max(abs(a - b) for a, b in zip(again[0], embedded[0], strict=True)) < 1e-6
    assert post(base_url, "/api/chat", CHAT).json()["message"]["content"] == said


def test_a_rerank_job_keeps_an_items_failure_its_own_and_a_dry_run_counts_its_pairs(
    base_url: str, reranker: tuple[str, Path]
) -> None:
    name, path = reranker
    _, tokens = reference_scores(path)
    long_document = " ".join(["the tower is in paris"] * 60)
    items = [
        {"custom_id": "a", "query": QUERY, "documents": DOCUMENTS},
        {"custom_id": "long", "query": QUERY, "documents": [DOCUMENTS[0], long_document], "truncate": False},
        {"custom_id": "b", "query": QUERY, "documents": DOCUMENTS, "top_n": 2},
    ]
    r = httpx.post(f"{base_url}/api/jobs", params={"dry_run": "true"}, timeout=120,
                   json={"model": name, "kind": "rerank", "items": [items[0], items[2]]})
    assert r.status_code == 200 and r.json()["prompt_tokens"] == 2 * tokens, r.text
    job = submit(base_url, model=name, kind="rerank", items=items)
    done = wait_done(base_url, job["id"])
    assert (done["counts"]["succeeded"], done["counts"]["failed"]) == (2, 1)
    lines = {line["custom_id"]: line for line in results(base_url, job["id"])}
    assert "truncate is false" in lines["long"]["error"]
    assert lines["a"]["response"]["usage"]["prompt_tokens"] == tokens  # packed with b's pairs, counted apart
    best = lines["a"]["response"]["results"]
    assert [x["index"] for x in lines["b"]["response"]["results"]] == [x["index"] for x in best[:2]]
    assert [x["relevance_score"] for x in lines["b"]["response"]["results"]] == pytest.approx(
        [x["relevance_score"] for x in best[:2]], abs=1e-5)
