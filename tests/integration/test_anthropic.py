"""Anthropic's Messages API and Message Batches, driven by the official ``anthropic`` SDK, unmodified, against the
session stack; raw replies are validated against the SDK's own types (``Message``, the stream events).

smollm2:135m does not decide to call tools on its own, so the tool tests force the call with ``tool_choice``
(a grammar, corral/toolchoice.py): what is tested is corral's part, the wire shapes and the round trip.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from corral.modelstore.catalog import packaged_smollm2
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack, wait_for
from tests.ggufs import with_metadata

MODEL = "smollm2"
ASK = [{"role": "user", "content": "Say hello to Ada."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                            "required": ["city"]}}
TOOLS_MODEL = "anthropic-tools"
SMALL_CONTEXT = 512
COLD = {"temperature": 0}  # the SDK (2.x) no longer has sampling arguments; corral still honours them
TEMPLATE = (  # ChatML that renders tools and asks for <tool_call> blocks (a Hermes-style template)
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    'Call one as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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
    for name, data in events:  # the event line and data.type agree, and the SDK parses it (it skips pings)
        assert data == {"type": "ping"} if name == "ping" else EVENTS.validate_python(data).type == name
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["usage"]["output_tokens"] == 8 and events[-2][1]["delta"]["stop_reason"] == "max_tokens"


@pytest.fixture(scope="module")
def tools_model(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """smollm2's GGUF with a chat template that renders tools (as tests/integration/test_tool_calls.py makes one)
    and a context of 512 tokens: Claude Code's first request is many times that."""
    source = packaged_smollm2()
    assert source is not None
    target = with_metadata(source, tmp_path_factory.mktemp("tools") / "tools.gguf",
                           {"tokenizer.chat_template": TEMPLATE, "llama.context_length": SMALL_CONTEXT})
    store = ModelStore(settings.models_path)
    store.register_gguf([TOOLS_MODEL], Path(target))
    wait_for(lambda: any(f"{TOOLS_MODEL}:latest" in json.loads(v).get("models", [])
                         for v in stack.redis.mget(list(stack.redis.scan_iter(match="corral:worker:*"))) if v),
             30, "the worker to serve the new model")
    yield TOOLS_MODEL
    store.delete(TOOLS_MODEL)


def test_a_forced_tool_call_round_trip(claude: anthropic.Anthropic, tools_model: str, base_url: str) -> None:
    reply = claude.messages.create(
        model=tools_model, max_tokens=64, messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}, extra_body=COLD,  # type: ignore[list-item]
    )
    assert reply.stop_reason == "tool_use"
    call = next(b for b in reply.content if b.type == "tool_use")
    assert call.name == "get_weather" and isinstance(call.input["city"], str) and call.id.startswith("toolu_")  # type: ignore[index]
    answer = claude.messages.create(
        model=tools_model, max_tokens=16, tools=[WEATHER], extra_body=COLD,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": [b.model_dump() for b in reply.content]},  # type: ignore[misc]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"},
                                               {"type": "text", "text": "So, what is it like?"}]}],
    )
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # streamed, "any" tool: the accumulator joins the input_json_delta into the call's input
    with claude.messages.stream(model=tools_model, max_tokens=64, messages=[{"role": "user", "content": "Paris?"}],
                                tools=[WEATHER], tool_choice={"type": "any"}, extra_body=COLD) as stream:  # type: ignore[list-item]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["tool_use"] and "city" in final.content[0].input  # type: ignore[union-attr]
    # tool_choice none: the tools are dropped, the reply is text
    text = claude.messages.create(model=tools_model, max_tokens=8, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                  tool_choice={"type": "none"}, extra_body=COLD)
    assert text.content[0].type == "text" and text.stop_reason != "tool_use"


def test_count_tokens_counts_with_the_model_template(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    reply = claude.messages.create(model=MODEL, max_tokens=1, messages=ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == reply.usage.input_tokens
    longer = claude.messages.count_tokens(model=MODEL, messages=ASK, system="You are a helpful assistant.")  # type: ignore[arg-type]
    assert longer.input_tokens > counted.input_tokens


def test_models_list_in_anthropic_shape(claude: anthropic.Anthropic) -> None:
    ids = [m.id for m in claude.models.list(limit=2)]  # pages with after_id until has_more is false
    assert "smollm2:135m" in ids and len(ids) == len(set(ids))
    assert claude.models.retrieve("smollm2").type == "model"
    with pytest.raises(anthropic.NotFoundError):
        claude.models.retrieve("no-such-model")


def test_a_claude_code_sized_first_request_is_fitted_and_answered(base_url: str, tools_model: str) -> None:
    """Claude Code's first request: ~19k tokens (a 76 KB system prompt, 24 tools) on a model whose context is
    512; corral keeps the system prompt's start and the newest turn, as Ollama's truncation does, and answers."""
    tools = [{"name": f"tool_{n}", "description": "Does a thing. " * 20,
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}} for n in range(24)]
    system = [{"type": "text", "text": "You are Claude Code. " + "Follow the rules of the house. " * 2500,
               "cache_control": {"type": "ephemeral"}}]
    body = {"model": tools_model, "max_tokens": 32000, "system": system, "tools": tools, "stream": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "thinking": {"type": "adaptive"}, "metadata": {"user_id": "u"}}
    assert len(json.dumps(body)) > 76_000
    events = _sse(base_url, {**body, "max_tokens": 4}, beta="true")  # streamed, as Claude Code asks
    names = [name for name, _ in events if name != "ping"]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    usage = events[-2][1]["usage"]
    # the prompt filled what the model holds (its context, shared by the worker's parallel slots) and no more
    assert 100 < usage["input_tokens"] <= SMALL_CONTEXT and events[-2][1]["delta"]["stop_reason"] == "max_tokens"


def _ended(claude: anthropic.Anthropic, ident: str, within: float = 120) -> Any:
    deadline = time.monotonic() + within
    while (batch := claude.messages.batches.retrieve(ident)).processing_status != "ended":
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


def test_message_batches_run_as_jobs_and_give_results(claude: anthropic.Anthropic, base_url: str) -> None:
    params = {"model": MODEL, "max_tokens": 6, "messages": ASK, "temperature": 0}
    batch = claude.messages.batches.create(requests=[  # type: ignore[list-item]
        {"custom_id": "ok-1", "params": params},
        {"custom_id": "ok-2", "params": {**params, "stop_sequences": ["\n"], "system": "Be brief."}},
        {"custom_id": "bad-1", "params": {**params, "max_tokens": 0}},
        {"custom_id": "bad-2", "params": {**params, "model": "another-model"}},
    ])
    assert batch.type == "message_batch" and batch.id.startswith("msgbatch_")
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 4
    assert batch.results_url is None
    assert batch.id in [b.id for b in claude.messages.batches.list(limit=1)]  # the SDK pages with after_id
    ended = _ended(claude, batch.id)
    assert ended.request_counts.succeeded == 2 and ended.request_counts.errored == 2 and ended.ended_at
    assert ended.results_url == f"{base_url}/v1/messages/batches/{batch.id}/results"
    results = {r.custom_id: r.result for r in claude.messages.batches.results(batch.id)}
    assert set(results) == {"ok-1", "ok-2", "bad-1", "bad-2"}
    ok = results["ok-1"]
    assert ok.type == "succeeded" and ok.message.content[0].text and ok.message.usage.output_tokens <= 6  # type: ignore[union-attr]
    assert results["bad-1"].type == "errored" and results["bad-1"].error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    assert "max_tokens" in results["bad-1"].error.error.message  # type: ignore[union-attr]
    raw = httpx.get(ended.results_url, timeout=30)
    for line in raw.text.splitlines():
        result = json.loads(line)["result"]
        if result["type"] == "succeeded":
            Message.model_validate(result["message"])
    assert claude.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.batches.retrieve(batch.id)


def test_a_cancelled_batch_ends_with_its_unrun_requests_canceled(claude: anthropic.Anthropic) -> None:
    params = {"model": MODEL, "max_tokens": 48, "messages": ASK}
    batch = claude.messages.batches.create(requests=[{"custom_id": f"r-{n}", "params": params} for n in range(12)])  # type: ignore[misc]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.batches.delete(batch.id)  # still processing: cancel it first
    canceling = claude.messages.batches.cancel(batch.id)
    assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at
    ended = _ended(claude, batch.id)
    counts = ended.request_counts
    assert counts.canceled > 0 and counts.succeeded + counts.canceled + counts.errored == 12 and counts.processing == 0
    kinds = {r.result.type for r in claude.messages.batches.results(batch.id)}
    assert "canceled" in kinds
    claude.messages.batches.delete(batch.id)
