"""all-minilm, converted by corral from the packaged safetensors, against sentence-transformers' own vectors;
embedding jobs batched per chunk with per-item truncate semantics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import numpy as np

from tests.helpers import results, submit, wait_done

MINILM = "all-minilm"
REFERENCE = Path(__file__).parent.parent / "fixtures" / "minilm_reference.json"


def cos(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def embed(base_url: str, inputs: list[str] | str, **extra: object) -> httpx.Response:
    return httpx.post(base_url + "/api/embed", json={"model": MINILM, "input": inputs, **extra}, timeout=120)


def test_all_minilm_matches_sentence_transformers(base_url: str) -> None:
    reference = json.loads(REFERENCE.read_text())["items"]
    assert len(reference) >= 20
    reply = embed(base_url, [r["text"] for r in reference])
    assert reply.status_code == 200, reply.text
    vectors = reply.json()["embeddings"]
    for ref, vec in zip(reference, vectors):
        a, b = np.asarray(ref["embedding"]), np.asarray(vec)
        assert len(b) == 384 and math.isclose(float(np.linalg.norm(b)), 1.0, rel_tol=1e-4)
        cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine >= 0.99, (ref["text"], cosine)
    # one at a time gives the same vector as packed with others (up to f16 rounding in a different batch shape)
    alone = embed(base_url, reference[3]["text"]).json()["embeddings"][0]
    assert cos(alone, vectors[3]) > 0.99999


def test_all_minilm_is_listed_under_its_aliases_as_an_embedding_model(base_url: str) -> None:
    names = {m["name"]: m for m in httpx.get(base_url + "/api/tags").json()["models"]}
    assert {"all-minilm:l6-v2", "all-minilm:latest", "all-minilm:22m"} <= set(names)
    assert names["all-minilm:latest"]["digest"] == names["all-minilm:l6-v2"]["digest"]
    assert names["all-minilm:l6-v2"]["details"]["family"] == "bert"
    assert names["all-minilm:l6-v2"]["details"]["quantization_level"] == "F16"
    show = httpx.post(base_url + "/api/show", json={"model": "all-minilm:l6-v2"}).json()
    assert show["capabilities"] == ["embedding"] and show["model_info"]["bert.pooling_type"] == 1
    chat = httpx.post(base_url + "/api/chat", json={"model": MINILM, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json() == {"error": '"all-minilm" does not support chat'}


def test_long_inputs_are_truncated_only_when_asked(base_url: str) -> None:
    long_text = "corral " * 700  # ~700 tokens, past all-minilm's 512
    refused = embed(base_url, long_text, truncate=False)
    assert refused.status_code == 400 and refused.json() == {"error": "the input length exceeds the context length"}
    cut = embed(base_url, long_text)
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] == 512


def test_embed_job_packs_a_chunk_and_keeps_per_item_results(base_url: str) -> None:
    texts = [f"Document number {i} is about {topic}." for i, topic in enumerate(["cats", "tax law", "rockets"] * 4)]
    items = [{"custom_id": f"d{i}", "input": t} for i, t in enumerate(texts)]
    items.append({"custom_id": "too-long", "input": "word " * 900, "truncate": False})
    items.append({"custom_id": "pair", "input": ["alpha", "beta"], "dimensions": 8})
    job = submit(base_url, kind="embed", model=MINILM, items=items, chunk_size=16)
    done = wait_done(base_url, job["id"])
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 13 and done["counts"]["failed"] == 1
    lines = {line["custom_id"]: line for line in results(base_url, job["id"])}
    assert lines["too-long"]["error"] == "the input length exceeds the context length"
    sync = embed(base_url, texts).json()["embeddings"]
    for i, vec in enumerate(sync):
        assert cos(lines[f"d{i}"]["response"]["embeddings"][0], vec) > 0.99999
    pair = lines["pair"]["response"]["embeddings"]
    assert len(pair) == 2 and all(len(v) == 8 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in pair)

