"""Tool calls with a tool-capable model: tools rendered into the prompt, calls parsed out of the reply.

No default model can use tools, so the test builds one: SmolLM2's GGUF with a Hermes-style chat template that
renders ``tools`` (written with the ``gguf`` package, registered in the session's model store; the worker
picks it up like any model pulled while it runs).  A 135M model does not decide to call tools on its own, so
the requests force the reply's shape with ``format``/``response_format``: what is tested is corral's part,
rendering, parsing, and both wire formats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from corral.modelstore.catalog import packaged_smollm2
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack, wait_for
from tests.ggufs import with_metadata
from tests.helpers import ASK, CALL_SHAPE, CHATML_TEMPLATE, WEATHER

pytestmark = pytest.mark.slow
MODEL = "smollm2-tools"
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tools_model(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    source = packaged_smollm2()
    assert source is not None
    target = with_metadata(source, tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf",
                           {"tokenizer.chat_template": TEMPLATE})
    store = ModelStore(settings.models_path)
    store.register_gguf([MODEL], Path(target))
    wait_for(lambda: any(MODEL in w.get("models", []) or f"{MODEL}:latest" in w.get("models", [])
                         for w in _workers(stack)), 30, "the worker to serve the new model")
    yield MODEL
    store.delete(MODEL)


def _workers(stack: Stack) -> list[dict]:
    return [json.loads(v) for v in stack.redis.mget(list(stack.redis.scan_iter(match="corral:worker:*"))) if v]


def test_the_model_advertises_tools_and_renders_them_into_its_prompt(base_url: str, tools_model: str) -> None:
    show = httpx.post(base_url + "/api/show", json={"model": tools_model}, timeout=30).json()
    assert "tools" in show["capabilities"]
    body = {"model": tools_model, "messages": ASK, "stream": False, "options": {"num_predict": 1, "temperature": 0}}
    plain = httpx.post(base_url + "/api/chat", json=body, timeout=120).json()
    with_tools = httpx.post(base_url + "/api/chat", json={**body, "tools": [WEATHER]}, timeout=120).json()
    # The tool's JSON (name, description, parameters) is in the prompt the model saw.
    assert with_tools["prompt_eval_count"] > plain["prompt_eval_count"] + 20


def test_ollama_chat_returns_parsed_tool_calls(base_url: str, tools_model: str) -> None:
    body = {"model": tools_model, "messages": ASK, "tools": [WEATHER], "format": CALL_SHAPE,
            "options": {"temperature": 0, "num_predict": 64}}
    reply = httpx.post(base_url + "/api/chat", json={**body, "stream": False}, timeout=120).json()
    message = reply["message"]
    assert message["content"] == ""
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["function"]["index"] == 0
    assert isinstance(call["function"]["arguments"]["city"], str)
    assert call["id"].startswith("call_")
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=120) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    calls = [c for line in lines for c in line["message"].get("tool_calls") or []]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert lines[-1]["done"] and all(not line["message"]["content"] for line in lines)


def test_prose_replies_still_stream_when_tools_are_offered(base_url: str, tools_model: str) -> None:
    body = {"model": tools_model, "messages": [{"role": "user", "content": "Say hello."}], "tools": [WEATHER],
            "options": {"temperature": 0, "num_predict": 24}}
    with httpx.stream("POST", base_url + "/api/chat", json=body, timeout=120) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    text = "".join(line["message"]["content"] for line in lines)
    assert text and "tool_calls" not in lines[-1]["message"]
    assert sum(1 for line in lines if line["message"]["content"]) > 1  # streamed, not held to the end


def test_openai_client_gets_tool_calls_and_finish_reason(base_url: str, tools_model: str) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    shape = {"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SHAPE}}
    reply = client.chat.completions.create(
        model=tools_model, messages=ASK, tools=[WEATHER], response_format=shape, temperature=0, max_tokens=64,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    stream = client.chat.completions.create(
        model=tools_model, messages=ASK, tools=[WEATHER], response_format=shape, temperature=0, max_tokens=64,  # type: ignore[arg-type]
        stream=True,
    )
    chunks = list(stream)
    names = [c.function.name for ch in chunks for c in (ch.choices[0].delta.tool_calls or []) if ch.choices]
    assert names == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_batch_lines_with_tools_come_back_as_calls(base_url: str, tools_model: str) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    shape = {"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SHAPE}}

    def line(custom_id: str, model: str, **body: object) -> dict:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 64, **body}}

    def batch_of(*lines: dict) -> str:
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        upload = client.files.create(file=("tools.jsonl", data), purpose="batch")
        return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id

    prose = line("prose", tools_model, messages=[{"role": "user", "content": "Say hello."}])
    ident = batch_of(line("call", tools_model, response_format=shape), prose)
    wait_for(lambda: client.batches.retrieve(ident).status == "completed", 180, "the tools batch")
    out = {x["custom_id"]: x["response"]["body"]["choices"][0]
           for x in map(json.loads, client.files.content(client.batches.retrieve(ident).output_file_id).text.splitlines())}
    assert out["call"]["finish_reason"] == "tool_calls"
    call = out["call"]["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert "city" in json.loads(call["function"]["arguments"])
    assert out["prose"]["finish_reason"] in ("stop", "length") and out["prose"]["message"]["content"]
    # a model without the tools capability (a ChatML TEMPLATE that never reads .Tools) fails the batch at the
    # first line that offers tools
    r = httpx.post(base_url + "/api/create", json={"model": "smollm2-untooled", "from": "smollm2",
                                                   "template": CHATML_TEMPLATE, "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    refused = client.batches.retrieve(batch_of(line("a", "smollm2-untooled", tools=None), line("b", "smollm2-untooled")))
    assert refused.status == "failed"
    error = refused.errors.data[0]  # type: ignore[union-attr]
    assert error.line == 2 and error.param == "body.tools" and "does not support tools" in (error.message or "")
    httpx.request("DELETE", base_url + "/api/delete", json={"model": "smollm2-untooled"}, timeout=30)
