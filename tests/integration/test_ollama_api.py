"""Ollama's native API over real HTTP, served by a real worker running the real SmolLM2 model."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from tests.helpers import MODEL, Registry

GREEDY = {"temperature": 0, "seed": 42}


def ndjson_lines(resp: httpx.Response) -> list[dict]:
    text = resp.text
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert all(lines), "NDJSON must have no blank lines"
    return [json.loads(line) for line in lines]








def test_generate_streams_ndjson_with_final_metrics(base_url: str) -> None:
    body = {"model": MODEL, "prompt": "Why is the sky blue?", "options": {**GREEDY, "num_predict": 12}}
    r = httpx.post(base_url + "/api/generate", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    chunks = ndjson_lines(r)
    assert all(c["done"] is False and c["model"] == MODEL for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["eval_count"] == 12
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert final["created_at"].endswith("Z")
    text = "".join(c["response"] for c in chunks)
    assert text.strip()
    # The same request without streaming gives the same text (greedy decoding) in one object.
    one = httpx.post(base_url + "/api/generate", json={**body, "stream": False}, timeout=60)
    assert one.headers["content-type"].startswith("application/json")
    assert one.json()["response"] == text
    assert one.json()["done"] is True


def test_generate_context_carries_a_conversation_on(base_url: str) -> None:
    """Ollama's deprecated ``context``: the final chunk's token list, which a next generate puts before its prompt
    (Ollama does so for every model, all of which have a TEMPLATE)."""
    body = {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False, "options": {**GREEDY, "num_predict": 6}}
    first = httpx.post(base_url + "/api/generate", json=body, timeout=60).json()
    assert len(first["context"]) == first["prompt_eval_count"] + first["eval_count"]
    follow = {**body, "prompt": "And at night?"}
    second = httpx.post(base_url + "/api/generate", json={**follow, "context": first["context"]}, timeout=60).json()
    alone = httpx.post(base_url + "/api/generate", json=follow, timeout=60).json()
    assert second["prompt_eval_count"] == alone["prompt_eval_count"] + len(first["context"])
    assert second["context"][:len(first["context"])] == first["context"]


def test_chat_stream_and_non_stream(base_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "USER", "content": "Say hello."}],
        "options": {**GREEDY, "num_predict": 8},
    }
    chunks = ndjson_lines(httpx.post(base_url + "/api/chat", json=body, timeout=60))
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert chunks[-1]["done"] is True and "eval_count" in chunks[-1]
    streamed = "".join(c["message"]["content"] for c in chunks)
    single = httpx.post(base_url + "/api/chat", json={**body, "stream": False}, timeout=60).json()
    assert single["message"] == {"role": "assistant", "content": streamed}
    assert single["done_reason"] in ("stop", "length")


def test_stop_strings_end_generation_without_emitting_the_stop(base_url: str) -> None:
    base = {"model": MODEL, "prompt": "Count from 1 to 20 separated by commas.", "stream": False}
    free = httpx.post(base_url + "/api/generate", json={**base, "options": {**GREEDY, "num_predict": 40}}, timeout=60)
    text = free.json()["response"]
    assert "5" in text, text
    stopped = httpx.post(
        base_url + "/api/generate", json={**base, "options": {**GREEDY, "num_predict": 40, "stop": ["5"]}}, timeout=60
    ).json()
    assert stopped["done_reason"] == "stop"
    assert "5" not in stopped["response"]
    assert text.startswith(stopped["response"])


def test_json_schema_format_constrains_output(base_url: str) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Invent a person. Reply in JSON with name and age."}],
        "format": schema,
        "stream": False,
        "options": {**GREEDY, "num_predict": 80},
    }
    reply = httpx.post(base_url + "/api/chat", json=body, timeout=60).json()
    data = json.loads(reply["message"]["content"])
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_embed_returns_normalized_vectors_in_order(base_url: str) -> None:
    r = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": ["first text", "second text"]}, timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["model"] == MODEL
    a, b = body["embeddings"]
    assert len(a) == len(b) == 576
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-4)
    assert a != b
    assert body["prompt_eval_count"] > 2 and body["total_duration"] > 0
    single = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": "second text"}, timeout=60).json()
    assert single["embeddings"][0] == pytest.approx(b, abs=1e-5)
    short = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": "x", "dimensions": 8}).json()
    assert len(short["embeddings"][0]) == 8
    assert math.isclose(sum(x * x for x in short["embeddings"][0]), 1.0, rel_tol=1e-4)


def test_legacy_embeddings_are_not_normalized(base_url: str) -> None:
    body = httpx.post(base_url + "/api/embeddings", json={"model": MODEL, "prompt": "hello"}, timeout=60).json()
    assert set(body) == {"embedding"}
    assert not math.isclose(sum(x * x for x in body["embedding"]), 1.0, rel_tol=1e-2)
    assert httpx.post(base_url + "/api/embeddings", json={"model": MODEL, "prompt": ""}).json() == {"embedding": []}


def test_embed_errors(base_url: str) -> None:
    r = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": [1, 2]})
    assert (r.status_code, r.json()) == (400, {"error": "invalid input type"})
    r = httpx.post(base_url + "/api/embed", json={"model": "nope", "input": "x"})
    assert (r.status_code, r.json()) == (404, {"error": 'model "nope" not found, try pulling it first'})
    r = httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": "word " * 5000, "truncate": False}, timeout=60)
    assert (r.status_code, r.json()) == (400, {"error": "the input length exceeds the context length"})
    assert httpx.post(base_url + "/api/embed", json={"model": MODEL, "input": []}).json() == {
        "model": MODEL,
        "embeddings": [],
    }


def loaded(base_url: str) -> list[str]:
    return [m["name"] for m in httpx.get(base_url + "/api/ps").json()["models"]]


def test_empty_prompt_loads_and_keep_alive_zero_unloads(base_url: str) -> None:
    r = httpx.post(base_url + "/api/generate", json={"model": MODEL}, timeout=60)
    assert r.json()["done_reason"] == "load" and r.json()["response"] == ""
    ps = httpx.get(base_url + "/api/ps").json()["models"]
    entry = next(m for m in ps if m["name"] == MODEL + ":latest")
    assert entry["size"] > 0 and entry["size_vram"] == 0 and entry["context_length"] == 4096
    assert entry["expires_at"] > time.strftime("%Y")
    r = httpx.post(base_url + "/api/chat", json={"model": MODEL, "messages": [], "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["message"] == {"role": "assistant", "content": ""}
    assert MODEL + ":latest" not in loaded(base_url)  # /api/ps is current when the reply ends, as in Ollama
    # keep_alive on a request sets the expiry /api/ps reports
    httpx.post(base_url + "/api/generate", json={"model": MODEL, "keep_alive": "1h"}, timeout=60)
    entry = next(m for m in httpx.get(base_url + "/api/ps").json()["models"] if m["name"] == MODEL + ":latest")
    hours_left = (time.mktime(time.strptime(entry["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime())) / 3600
    assert 0.9 < hours_left < 1.1
    # a request with keep_alive 0 unloads its model as it ends: gone from /api/ps as soon as the reply is
    r = httpx.post(base_url + "/api/generate", timeout=60, json={
        "model": MODEL, "prompt": "Hi", "stream": False, "keep_alive": 0, "options": {"num_predict": 2}})
    assert r.json()["done"] and MODEL + ":latest" not in loaded(base_url)
    httpx.post(base_url + "/api/embed", json={"model": "all-minilm", "input": ["loaded now"], "keep_alive": "5m"}, timeout=60)
    assert "all-minilm:latest" in loaded(base_url)


def test_copy_then_delete_a_model(base_url: str) -> None:
    assert httpx.post(base_url + "/api/copy", json={"source": MODEL, "destination": "mycopy:v1"}).status_code == 200
    names = [m["name"] for m in httpx.get(base_url + "/api/tags").json()["models"]]
    assert "mycopy:v1" in names
    reply = httpx.post(
        base_url + "/api/generate",
        json={"model": "mycopy:v1", "prompt": "Hi", "stream": False, "options": {"num_predict": 3, "temperature": 0}},
        timeout=60,
    )
    assert reply.json()["model"] == "mycopy:v1" and reply.json()["eval_count"] == 3
    r = httpx.request("DELETE", base_url + "/api/delete", json={"model": "mycopy:v1"})
    assert r.status_code == 200 and r.content == b""
    assert "mycopy:v1" not in [m["name"] for m in httpx.get(base_url + "/api/tags").json()["models"]]
    assert MODEL + ":latest" in [m["name"] for m in httpx.get(base_url + "/api/tags").json()["models"]]
    r = httpx.request("DELETE", base_url + "/api/delete", json={"model": "mycopy:v1"})
    assert (r.status_code, r.json()) == (404, {"error": "model 'mycopy:v1' not found"})
    r = httpx.post(base_url + "/api/copy", json={"source": "nope", "destination": "x"})
    assert (r.status_code, r.json()) == (404, {"error": 'model "nope" not found'})


def test_client_disconnect_stops_generation(base_url: str) -> None:
    """A client that walks away frees the worker: the next request does not wait for 2000 tokens."""
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "options": {"num_predict": 2000}}
    with httpx.stream("POST", base_url + "/api/generate", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    started = time.monotonic()
    quick = httpx.post(
        base_url + "/api/generate",
        json={"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}},
        timeout=120,
    )
    assert quick.json()["eval_count"] == 4
    # 2000 tokens take ~25s on 2 cores; a stopped generation leaves the worker free at once.
    assert time.monotonic() - started < 8


def test_pull_builds_catalog_models_and_refuses_unknown_ones_like_ollama(base_url: str, local_registry: Registry) -> None:
    reply = httpx.post(base_url + "/api/pull", json={"model": "smollm2:135m"}, timeout=60)
    lines = [json.loads(x) for x in reply.text.splitlines()]
    assert [x["status"] for x in lines][0] == "pulling manifest" and lines[-1] == {"status": "success"}
    layer = next(x for x in lines if "digest" in x)
    assert layer["status"] == f"pulling {layer['digest'][7:19]}" and layer["total"] == layer["completed"] > 0
    r = httpx.post(base_url + "/api/pull", json={"model": "smollm2", "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    nope = f"{local_registry.host}/library/nope"  # a registry that does not have it (tests reach no hub)
    r = httpx.post(base_url + "/api/pull", json={"model": nope, "stream": False, "insecure": True})
    assert r.status_code == 500 and r.json() == {"error": "pull model manifest: file does not exist"}
    r = httpx.post(base_url + "/api/pull", json={"model": nope, "insecure": True})
    assert r.status_code == 200
    assert [json.loads(x) for x in r.text.splitlines()] == [
        {"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}
    ]
    assert httpx.post(base_url + "/api/pull", json={}).json() == {"error": "model is required"}
    assert httpx.post(base_url + "/api/pull", json={"model": "../../etc"}).status_code == 400
