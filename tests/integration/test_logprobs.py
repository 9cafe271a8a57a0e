"""Log-probabilities on every route that takes them, in each API's shape: the chosen token's value is the
model's own (a llama.cpp run in this process over the same prompt gives it), alternatives come most likely
first, and they arrive streamed, not streamed, through the openai client and in job results."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from openai import OpenAI

from corral.modelstore.store import ModelStore
from corral.settings import Settings
from tests.helpers import MODEL, results, submit, wait_done
from workers.weights import choose_weights, derived_path

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "num_predict": 4}


def generate(base_url: str, **body: object) -> dict:  # type: ignore[type-arg]
    r = httpx.post(base_url + "/api/generate", timeout=120, json={
        "model": MODEL, "prompt": PROMPT, "raw": True, "options": GREEDY, "stream": False, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_first_tokens_logprob_is_the_models_own(base_url: str, settings: Settings) -> None:
    reply = generate(base_url, logprobs=True, top_logprobs=3)
    entries = reply["logprobs"]
    assert len(entries) == reply["eval_count"] == 4
    assert "".join(e["token"] for e in entries) == reply["response"]
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"]  # greedy: the likeliest
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
    import llama_cpp

    # The weights the worker decodes with: SmolLM2's own Q4_1, or the Q8_0 copy a CPU worker with several slots
    # makes of them (workers/weights.py).
    record = ModelStore(settings.models_path).get(MODEL)
    weights = choose_weights(settings.cpu_weights, record.config["file_type"], on_cpu=True,
                             parallel=settings.num_parallel, embedding=False)
    path = record.model_path if weights == "native" else derived_path(record.model_path, weights)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, flash_attn=True, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
        llm.eval(tokens)
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)  # the last prompt token's logits
        logits = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)
        chosen = int(np.argmax(logits))
        chosen_text = llm.detokenize([chosen]).decode()
    finally:
        llm.close()
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = entries[0]
    assert chosen_text == first["token"]
    assert first["logprob"] == pytest.approx(expected[chosen], abs=0.02)
    # Without logprobs nothing is added; top_logprobs past 20 is Ollama's 400.
    assert "logprobs" not in generate(base_url)
    r = httpx.post(base_url + "/api/generate", json={"model": MODEL, "prompt": "x", "logprobs": True, "top_logprobs": 21})
    assert (r.status_code, r.json()) == (400, {"error": "top_logprobs must be between 0 and 20"})


def test_streamed_chat_and_the_openai_shapes(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "options": GREEDY, "logprobs": True}
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=120) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    streamed = [e for line in lines for e in line.get("logprobs") or []]
    assert len(streamed) == lines[-1]["eval_count"] and all("top_logprobs" not in e for e in streamed)
    assert "".join(e["token"] for e in streamed) == "".join(line["message"]["content"] for line in lines)

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [c.token for c in content] == [e["token"] for e in streamed]  # the same greedy tokens
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in streamed], abs=1e-3)
    assert all(len(c.top_logprobs) == 2 for c in content)
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.content) == 3  # type: ignore[union-attr, attr-defined]
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
                                            temperature=0, logprobs=True, stream=True)
    assert sum(len(c.choices[0].logprobs.content or []) for c in chunks if c.choices and c.choices[0].logprobs) == 4


def test_job_results_carry_them(base_url: str) -> None:
    job = submit(base_url, model=MODEL, kind="generate", items=[
        {"prompt": PROMPT, "raw": True, "options": GREEDY, "logprobs": True, "top_logprobs": 1},
        {"prompt": PROMPT, "raw": True, "options": GREEDY}])
    assert wait_done(base_url, job["id"])["counts"]["succeeded"] == 2
    with_lp, without = (line["response"] for line in results(base_url, job["id"]))
    assert len(with_lp["logprobs"]) == with_lp["eval_count"] and "logprobs" not in without
    sync = generate(base_url, logprobs=True)
    assert [e["token"] for e in with_lp["logprobs"]] == [e["token"] for e in sync["logprobs"]]


def test_the_ollama_client_reads_them(base_url: str) -> None:
    import ollama

    reply = ollama.Client(host=base_url).generate(model=MODEL, prompt=PROMPT, raw=True, options=GREEDY, logprobs=True,
                                                  top_logprobs=2)
    assert reply.logprobs is not None and len(reply.logprobs) == reply.eval_count
    first = reply.logprobs[0]
    assert first.top_logprobs is not None and first.top_logprobs[0].token == first.token
