"""The default model as Ollama's library ships it (#35 item 5): smollm2 has the ``tools`` capability, so a client
that always sends its tool list (Continue's ``ollama`` provider) gets an answer, not ``does not support tools``,
through the Ollama client and the OpenAI client, and a tool round trip (call, result, answer) renders through the
model's TEMPLATE.

A 135M model does not decide to call a tool on its own, so the first turn forces the call's shape with ``format``:
what is tested is corral's part (the capability, the prompt, the parsing, both wire formats)."""

from __future__ import annotations

import httpx
import ollama
from openai import OpenAI

from tests.helpers import ASK, CALL_SHAPE, MODEL, WEATHER


def test_show_lists_tools_and_a_chat_with_tools_is_answered(base_url: str) -> None:
    shown = httpx.post(base_url + "/api/show", json={"model": MODEL}, timeout=30).json()
    assert shown["capabilities"] == ["completion", "tools"]
    assert "{{- if .Tools }}" in shown["template"] and "<tool_call>" in shown["template"]
    assert 'TEMPLATE """' in shown["modelfile"]

    client = ollama.Client(host=base_url)
    plain = client.chat(model=MODEL, messages=ASK, options={"num_predict": 1, "temperature": 0})
    prose = client.chat(model=MODEL, messages=ASK, tools=[WEATHER], options={"num_predict": 8, "temperature": 0})
    assert prose.done and prose.message.role == "assistant"
    assert (prose.prompt_eval_count or 0) > (plain.prompt_eval_count or 0) + 40  # the tool's JSON is in the prompt

    called = client.chat(model=MODEL, messages=ASK, tools=[WEATHER], format=CALL_SHAPE,
                         options={"num_predict": 48, "temperature": 0})
    calls = called.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"] and "city" in calls[0].function.arguments
    answer = client.chat(model=MODEL, tools=[WEATHER], options={"num_predict": 8, "temperature": 0}, messages=[
        *ASK, called.message, {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}])
    assert answer.done and answer.message.content
    assert (answer.prompt_eval_count or 0) > (prose.prompt_eval_count or 0)  # the call and its result were rendered


def test_the_openai_client_with_tools_is_answered(base_url: str) -> None:
    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
