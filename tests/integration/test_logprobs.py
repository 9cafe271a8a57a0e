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
from openai.types.completion_choice import Logprobs

from corral.modelstore.store import ModelStore
from corral.settings import Settings
from corral.wire.openai import from_native_final, stream_chunks
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


def test_legacy_completions_carry_openais_own_fields(base_url: str) -> None:
    """/v1/completions with ``logprobs: n``: the official client's Logprobs model gets tokens, token_logprobs,
    top_logprobs (token -> logprob, the chosen one always among them) and text_offset, streamed or not; Ollama's
    chat-style ``content`` stays beside them."""
    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    choice = whole.choices[0]
    assert isinstance(choice.logprobs, Logprobs)
    raw = Logprobs.model_validate(choice.logprobs.model_dump())  # the fields as the SDK's model types them
    tokens, values, tops, offsets = raw.tokens, raw.token_logprobs, raw.top_logprobs, raw.text_offset
    assert tokens is not None and values is not None and tops is not None and offsets is not None
    assert len(tokens) == len(values) == len(tops) == len(offsets) == whole.usage.completion_tokens == 4  # type: ignore[union-attr]
    assert "".join(tokens) == choice.text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # where each starts in text
    for token, value, top in zip(tokens, values, tops):
        assert 2 <= len(top) <= 3 and top[token] == value  # greedy: the chosen token is the likeliest
        assert max(top.values()) == value and all(v <= 0 for v in top.values())
    content = choice.logprobs.content  # type: ignore[attr-defined]
    assert [c["token"] for c in content] == tokens and [c["logprob"] for c in content] == values

    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    assert all(isinstance(lp, Logprobs) for lp in streamed)
    assert [t for lp in streamed for t in lp.tokens or []] == tokens
    assert [o for lp in streamed for o in lp.text_offset or []] == offsets  # offsets continue across chunks
    assert [v for lp in streamed for v in lp.token_logprobs or []] == pytest.approx(values, abs=1e-3)
    # Without logprobs there is no logprobs object; logprobs past 20 is OpenAI's 400.
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    assert plain.choices[0].logprobs is None
    r = httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_the_legacy_shape_of_a_batch_line_and_of_odd_alternatives() -> None:
    """No processes: an OpenAI batch line's completion (from the stored native result) has the legacy fields too;
    a sampled token outside the alternatives is added to its map (n + 1 entries, as OpenAI's), and of two
    alternatives that read the same the likelier stays."""
    entries = [
        {"token": " Paris", "logprob": -2.5, "top_logprobs": [{"token": " the", "logprob": -0.5},
                                                              {"token": " a", "logprob": -1.0}]},
        {"token": ".", "logprob": -0.1, "top_logprobs": [{"token": ".", "logprob": -0.1}, {"token": ".", "logprob": -4.0}]},
    ]
    body = from_native_final("generate", MODEL, {"response": " Paris.", "eval_count": 2, "logprobs": entries}, 0)
    legacy = Logprobs.model_validate(body["choices"][0]["logprobs"])
    assert legacy.tokens == [" Paris", "."] and legacy.token_logprobs == [-2.5, -0.1] and legacy.text_offset == [0, 6]
    assert legacy.top_logprobs == [{" the": -0.5, " a": -1.0, " Paris": -2.5}, {".": -0.1}]
    native = [{"response": " Paris", "done": False, "logprobs": entries[:1]},
              {"response": ".", "done": False, "logprobs": entries[1:]}, {"response": "", "done": True}]
    chunks = [c["choices"][0].get("logprobs") for c in stream_chunks("generate", MODEL, False, iter(native))]
    assert [c["text_offset"] for c in chunks if c] == [[0], [6]] and chunks[-1] is None


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
