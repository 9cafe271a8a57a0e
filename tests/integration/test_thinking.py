"""Thinking, on a model built for the test: SmolLM2 with a TEMPLATE that has Ollama's thinking tags around
``.Thinking`` and opens a ``<think>`` block for the model when thinking is on (as DeepSeek-R1's template does).
SmolLM2 has no reasoning training, so within a few tokens it never closes the block: with thinking on, all it
says is thinking; with thinking off the block is closed for it and all it says is content.  The routing from
the tags is what is tested, through Ollama's and OpenAI's routes, streamed and not, and in a batch job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.helpers import MODEL, cli, results, submit, wait_done

TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ if .Thinking }}<think>{{ .Thinking }}</think>\n{{ end }}{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
    "{{ if .Think }}<think>\n{{ else }}<think>\n\n</think>\n\n{{ end }}"
)
ASK = [{"role": "user", "content": "What is 17 times 3?"}]
FEW = {"temperature": 0, "num_predict": 10}


@pytest.fixture(scope="module")
def thinker(base_url: str) -> Iterator[str]:
    r = httpx.post(base_url + "/api/create", timeout=120,
                   json={"model": "thinker", "from": MODEL, "template": TEMPLATE, "stream": False})
    assert r.json() == {"status": "success"}, r.text
    yield "thinker"
    httpx.request("DELETE", base_url + "/api/delete", json={"model": "thinker"})


def chat(base_url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(base_url + "/api/chat", timeout=120, json={"messages": ASK, "options": FEW, "stream": False, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_the_capability_comes_from_the_template(base_url: str, thinker: str) -> None:
    shown = httpx.post(base_url + "/api/show", json={"model": thinker}).json()
    assert shown["capabilities"] == ["completion", "thinking"]
    r = httpx.post(base_url + "/api/chat", json={"model": MODEL, "messages": ASK, "think": True})
    assert (r.status_code, r.json()) == (400, {"error": f'"{MODEL}" does not support thinking'})
    r = httpx.post(base_url + "/api/chat", json={"model": thinker, "messages": ASK, "think": "deep"})
    assert r.status_code == 400 and r.json()["error"].startswith('invalid think value: "deep"')


def test_thinking_goes_to_thinking_and_never_to_content(base_url: str, thinker: str) -> None:
    on = chat(base_url, model=thinker)  # a thinking model thinks unless told not to, as Ollama's do
    assert on["message"]["thinking"].strip() and on["message"]["content"] == "" and on["eval_count"] == 10
    off = chat(base_url, model=thinker, think=False)
    assert "thinking" not in off["message"] and off["message"]["content"].strip()
    with httpx.stream("POST", base_url + "/api/chat", timeout=120,
                      json={"model": thinker, "messages": ASK, "options": FEW, "think": "high"}) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    assert "".join(line["message"].get("thinking", "") for line in lines) == on["message"]["thinking"]
    assert all(line["message"]["content"] == "" for line in lines) and lines[-1]["done"]
    generated = httpx.post(base_url + "/api/generate", timeout=120, json={
        "model": thinker, "prompt": ASK[0]["content"], "options": FEW, "stream": False}).json()
    assert generated["thinking"] == on["message"]["thinking"] and generated["response"] == ""


def test_openai_reasoning_effort_and_the_reasoning_field(base_url: str, thinker: str) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model=thinker, messages=ASK, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                           reasoning_effort="low")
    message = reply.choices[0].message
    assert (message.model_extra or {}).get("reasoning", "").strip() and message.content == ""
    plain = client.chat.completions.create(model=thinker, messages=ASK, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                           reasoning_effort="none")
    assert plain.choices[0].message.content and not (plain.choices[0].message.model_extra or {}).get("reasoning")
    stream = client.chat.completions.create(model=thinker, messages=ASK, max_tokens=10, temperature=0, stream=True)  # type: ignore[arg-type]
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning", "") for d in deltas).strip()
    assert not "".join(d.content or "" for d in deltas)


def test_job_items_think_too(base_url: str, thinker: str) -> None:
    job = submit(base_url, model=thinker, kind="chat",
                 items=[{"messages": ASK, "options": FEW}, {"messages": ASK, "options": FEW, "think": False}])
    assert wait_done(base_url, job["id"])["counts"]["succeeded"] == 2
    first, second = (line["response"]["message"] for line in results(base_url, job["id"]))
    assert first["thinking"].strip() and first["content"] == ""
    assert "thinking" not in second and second["content"].strip()
    r = httpx.post(base_url + "/api/jobs", json={"model": MODEL, "kind": "chat", "items": [{"messages": ASK, "think": True}]})
    assert (r.status_code, r.json()) == (400, {"error": f'item 1: "{MODEL}" does not support thinking'})


def test_corral_run_think_and_hidethinking(base_url: str, thinker: str) -> None:
    args = ("run", thinker, "What is 17 times 3?", "-o", "num_predict=10", "-o", "temperature=0")
    shown = cli(base_url, *args)
    assert shown.exit_code == 0 and shown.stdout.startswith("Thinking...\n") and "...done thinking." in shown.stdout
    hidden = cli(base_url, *args, "--hidethinking")
    assert hidden.exit_code == 0 and "Thinking" not in hidden.stdout and not hidden.stdout.strip()
    off = cli(base_url, *args, "--think=false")
    assert off.exit_code == 0 and "Thinking" not in off.stdout and off.stdout.strip()


def test_the_ollama_client_reads_thinking(base_url: str, thinker: str) -> None:
    import ollama

    client = ollama.Client(host=base_url)
    reply = client.chat(model=thinker, messages=ASK, options=FEW)
    assert reply.message.thinking and reply.message.content == ""
    plain = client.generate(model=thinker, prompt=ASK[0]["content"], think=False, options=FEW)
    assert plain.thinking is None and plain.response
