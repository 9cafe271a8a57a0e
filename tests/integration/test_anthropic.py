"""Anthropic's Messages API and Message Batches, driven by the official ``anthropic`` SDK, unmodified, against the
session stack; raw replies are validated against the SDK's own types (``Message``, the stream events).

smollm2:135m does not decide to call tools on its own, so the tool tests force the call with ``tool_choice``
(a grammar, corral/toolchoice.py): what is tested is corral's part, the wire shapes and the round trip.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from harness.stack import Stack

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Say hello to Ada."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                            "required": ["city"]}}
COLD = {"temperature": 0}  # the SDK (2.x) no longer has sampling arguments; corral still honours them
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


@pytest.fixture(scope="module")
def claude(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base_url, api_key="unused", max_retries=0, timeout=120)


def _sse(base_url: str, body: dict[str, Any], **params: str) -> list[tuple[str, dict[str, Any]]]:
    """The raw stream: (event line, data) pairs."""
    out = []
    with httpx.stream("POST", base_url + "/v1/messages", json={**body, "stream": True}, params=params,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def test_create_answers_a_message_the_sdk_types_accept(claude: anthropic.Anthropic, base_url: str) -> None:
    reply = claude.messages.create(model=MODEL, max_tokens=12, messages=ASK, extra_body=COLD,  # type: ignore[arg-type]
                                   system=[{"type": "text", "text": "You are kind.", "cache_control": {"type": "ephemeral"}}])
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens > 5 and 0 < reply.usage.output_tokens <= 12
    short = claude.messages.create(model=MODEL, max_tokens=2, messages=ASK, extra_body=COLD)  # type: ignore[arg-type]
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    # what Claude Code sends besides: beta query and headers, system turns, metadata, effort, a huge max_tokens
    raw = httpx.post(base_url + "/v1/messages?beta=true", timeout=120, headers={
        "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
        json={"model": MODEL, "max_tokens": 64000, "temperature": 0, "metadata": {"user_id": "u1"},
              "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
              "context_management": {"edits": []},
              "messages": [{"role": "system", "content": "Answer in one word."}, *ASK,
                           {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                           {"role": "user", "content": [{"type": "text", "text": "Again?",
                                                         "cache_control": {"type": "ephemeral"}}]}]})
    assert raw.status_code == 200, raw.text
    message = Message.model_validate(raw.json())
    assert message.stop_reason in ("end_turn", "max_tokens")


def test_stop_sequences_end_the_reply_and_are_named(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model=MODEL, max_tokens=40, messages=ASK, extra_body=COLD, stop_sequences=[" "])  # type: ignore[arg-type]
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == " "
    assert " " not in reply.content[0].text  # type: ignore[union-attr]


def test_stream_events_come_in_order_and_the_accumulator_builds_the_message(
    claude: anthropic.Anthropic, base_url: str
) -> None:
    with claude.messages.stream(model=MODEL, max_tokens=16, messages=ASK, extra_body=COLD) as stream:  # type: ignore[arg-type]
        texts = [event.delta.text for event in stream if event.type == "content_block_delta"
                 and event.delta.type == "text_delta"]
        final = stream.get_final_message()
    assert len(texts) > 1 and final.content[0].text == "".join(texts)  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.input_tokens > 5
    events = _sse(base_url, {"model": MODEL, "max_tokens": 8, "messages": ASK, "temperature": 0}, beta="true")
    for name, data in events:
        assert EVENTS.validate_python(data).type == name  # the event line and data.type agree, and the SDK parses it
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == 8 and events[-2][1]["delta"]["stop_reason"] == "max_tokens"
