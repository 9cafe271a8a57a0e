"""Rerank as its clients use it, on the session's real worker with a tiny cross-encoder created from a GGUF:
Cohere's own SDK against /v2/rerank (what LangChain's and LlamaIndex's Cohere rerankers build), plain httpx
against llama.cpp's /v1/rerank and TEI's body, a rerank job, and /v1/rerank lines in an OpenAI batch."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import cohere
import httpx
import openai
import pytest

from tests.helpers import results, submit, wait_done

QUERY = "what is the capital city of france"
DOCUMENTS = [
    "berlin is the capital of germany",
    "paris is the capital city of france",
    "the river flows into the sea",
    "football is a game",
]


def rerank(base_url: str, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return httpx.post(base_url + path, json=body, timeout=120)


@pytest.fixture(scope="module")
def scores(base_url: str, reranker: tuple[str, Path]) -> list[float]:
    """Each document's raw score, in the documents' order (from llama.cpp's reply, which is sorted)."""
    r = rerank(base_url, model=reranker[0], query=QUERY, documents=DOCUMENTS)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert (reply["model"], reply["object"]) == (reranker[0], "list")
    assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] > 4 * 6
    assert sorted(result["index"] for result in reply["results"]) == [0, 1, 2, 3]
    ordered = [result["relevance_score"] for result in reply["results"]]
    assert ordered == sorted(ordered, reverse=True)
    assert "document" not in reply["results"][0]  # llama.cpp's shape: no documents unless asked
    by_index = {result["index"]: result["relevance_score"] for result in reply["results"]}
    assert len(set(by_index.values())) == 4  # the documents' words move the score
    return [by_index[i] for i in range(4)]


def test_llama_server_and_jina_shapes(base_url: str, reranker: tuple[str, Path], scores: list[float]) -> None:
    best = sorted(range(4), key=lambda i: -scores[i])
    for path in ("/rerank", "/v1/reranking"):
        r = rerank(base_url, path, model=reranker[0], query=QUERY, documents=DOCUMENTS, top_n=2,
                   return_documents=True)
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [x["index"] for x in got] == best[:2]
        assert [x["document"] for x in got] == [{"text": DOCUMENTS[i]} for i in best[:2]]
        assert [x["relevance_score"] for x in got] == pytest.approx([scores[i] for i in best[:2]], abs=1e-5)
    # Jina's and Cohere v1's {text} documents are the same documents
    r = rerank(base_url, model=reranker[0], query=QUERY, documents=[{"text": d} for d in DOCUMENTS], top_n=1)
    assert r.json()["results"][0]["index"] == best[0]
    # TEI's body (texts) gets TEI's bare array
    r = rerank(base_url, model=reranker[0], query=QUERY, texts=DOCUMENTS, return_text=True)
    assert [x["index"] for x in r.json()] == best
    assert r.json()[0] == {"index": best[0], "score": pytest.approx(scores[best[0]], abs=1e-5),
                           "text": DOCUMENTS[best[0]]}


def test_cohere_sdk_reranks_with_scores_in_0_1(base_url: str, reranker: tuple[str, Path],
                                               scores: list[float]) -> None:
    co = cohere.ClientV2(api_key="unused", base_url=base_url)
    reply = co.rerank(model=reranker[0], query=QUERY, documents=DOCUMENTS, top_n=3)
    best = sorted(range(4), key=lambda i: -scores[i])
    assert [r.index for r in reply.results] == best[:3]
    assert [r.relevance_score for r in reply.results] == pytest.approx(
        [1 / (1 + math.exp(-scores[i])) for i in best[:3]], abs=1e-5)
    assert all(0 <= r.relevance_score <= 1 for r in reply.results)
    assert reply.meta is not None and reply.meta.tokens is not None and reply.meta.tokens.input_tokens
    with pytest.raises(cohere.BadRequestError):  # a model that is not a reranker, in Cohere's error shape
        co.rerank(model="all-minilm", query=QUERY, documents=DOCUMENTS)


def test_a_rerank_job_gives_what_the_route_gives(base_url: str, reranker: tuple[str, Path],
                                                 scores: list[float]) -> None:
    job = submit(base_url, model=reranker[0], kind="rerank", items=[
        {"custom_id": "all", "query": QUERY, "documents": DOCUMENTS},
        {"custom_id": "top", "query": QUERY, "documents": DOCUMENTS, "top_n": 1, "return_documents": True},
        {"custom_id": "reversed", "query": QUERY, "documents": DOCUMENTS[::-1]},
    ])
    assert wait_done(base_url, job["id"])["counts"]["succeeded"] == 3
    lines = {line["custom_id"]: line["response"] for line in results(base_url, job["id"])}
    best = sorted(range(4), key=lambda i: -scores[i])
    assert [r["index"] for r in lines["all"]["results"]] == best
    assert [r["relevance_score"] for r in lines["all"]["results"]] == pytest.approx(
        [scores[i] for i in best], abs=1e-4)  # packed with the other items' pairs, the same scores
    assert lines["top"]["results"] == [{"index": best[0], "relevance_score": pytest.approx(scores[best[0]], abs=1e-4),
                                        "document": {"text": DOCUMENTS[best[0]]}}]
    assert [r["index"] for r in lines["reversed"]["results"]] == [3 - i for i in best]
    assert lines["all"]["usage"]["prompt_tokens"] > 0


def test_an_openai_batch_of_rerank_lines(base_url: str, reranker: tuple[str, Path], scores: list[float]) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    lines = [{"custom_id": f"r{n}", "method": "POST", "url": "/v1/rerank",
              "body": {"model": reranker[0], "query": QUERY, "documents": DOCUMENTS, "top_n": 2}} for n in range(2)]
    upload = client.files.create(file=("rerank.jsonl", io.BytesIO("\n".join(map(json.dumps, lines)).encode())),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/rerank",  # type: ignore[arg-type]
                                  completion_window="24h")
    for _ in range(240):
        batch = client.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.5)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    best = sorted(range(4), key=lambda i: -scores[i])
    for line in out:
        assert line["response"]["status_code"] == 200
        assert [r["index"] for r in line["response"]["body"]["results"]] == best[:2]


def test_a_reranker_takes_no_embed_job_and_an_embedder_no_rerank_job(base_url: str, reranker: tuple[str, Path]) -> None:
    r = httpx.post(base_url + "/api/jobs", json={"kind": "embed", "model": reranker[0], "items": [{"input": "x"}]},
                   timeout=30)
    assert (r.status_code, r.json()["error"]) == (
        400, f'"{reranker[0]}" does not support embeddings: it is a reranker (use /v1/rerank or a rerank job)')
    r = httpx.post(base_url + "/api/jobs", timeout=30, json={
        "kind": "rerank", "model": "all-minilm", "items": [{"query": "q", "documents": ["d"]}]})
    assert r.status_code == 400 and "does not support rerank" in r.json()["error"]
