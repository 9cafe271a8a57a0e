"""A Messages reply as its stream of events and as one ``Message``, from native chat chunks: no worker needed.

The events are parsed with the anthropic SDK's own types and folded by its own accumulator (the code behind
``messages.stream(...).get_final_message()``), which raises on an event out of order or an index that is not
the next block's.  The ping and late-error paths run the route's real pump on a slow chunk iterator.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from flask import Flask
from pydantic import TypeAdapter

from api.anthropic import events
from api.streaming import Pump
from corral.errors import WorkerUnavailable
from corral.toolchoice import Constrained, ToolChoice
from corral.wire.anthropic import MessagesRequest, parse
from corral.wire.anthropic_reply import Reply
from tests.helpers import chat_chunk

EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
PLAIN = Constrained(None, None)
CALL = {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}


def done(reason: str = "stop", prompt: int = 12, generated: int = 5) -> dict[str, Any]:
    return {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": reason,
            "prompt_eval_count": prompt, "eval_count": generated}


def fold(reply: Reply, chunks: list[dict[str, Any]]) -> tuple[list[str], Message]:
    """The stream's event names, and the Message the SDK's accumulator builds from them."""
    names, snapshot, bufs = [], None, {}
    start = [reply.start()]
    for name, data in start + [e for c in chunks for e in reply.feed(c)]:
        event = EVENTS.validate_python(data)
        assert event.type == name
        names.append(name)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return names, Message.model_validate(snapshot.model_dump())


def test_thinking_text_and_a_call_stream_as_dense_blocks_and_fold_into_the_message() -> None:
    reply = Reply("m", [], PLAIN)
    names, message = fold(reply, [chat_chunk(thinking="Hmm, "), chat_chunk(thinking="weather."), chat_chunk("Checking"),
                                  chat_chunk(" now."), chat_chunk(calls=[CALL]), done()])
    assert names == ["message_start",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Hmm, weather." and message.content[1].text == "Checking now."  # type: ignore[union-attr]
    assert message.content[2].input == {"city": "Oslo"} and message.stop_reason == "tool_use"  # type: ignore[union-attr]
    assert message.usage.input_tokens == 12 and message.usage.output_tokens == 5
    whole = Message.model_validate(reply.message())  # the non-streamed object says the same
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"] and whole.stop_reason == "tool_use"


def test_a_stop_sequence_split_across_chunks_ends_the_text_and_stops_the_worker() -> None:
    stopped: list[bool] = []
    reply = Reply("m", ["\n\n", "END"], PLAIN, on_stop=lambda: stopped.append(True))
    pieces = [chat_chunk(text) for text in ("Hello", " world\n", "\nmore", "text")]
    _, message = fold(reply, [*pieces, done("cancelled")])
    assert message.content[0].text == "Hello world" and message.stop_reason == "stop_sequence"  # type: ignore[union-attr]
    assert message.stop_sequence == "\n\n" and stopped == [True]
    held = Reply("m", ["END"], PLAIN)  # a text ending in a stop's beginning is passed on at the end after all
    _, message = fold(held, [chat_chunk("Almost EN"), done()])
    assert message.content[0].text == "Almost EN" and message.stop_reason == "end_turn"  # type: ignore[union-attr]


def test_max_tokens_and_an_empty_reply() -> None:
    _, message = fold(Reply("m", [], PLAIN), [chat_chunk("a"), done("length")])
    assert message.stop_reason == "max_tokens"
    names, message = fold(Reply("m", [], PLAIN), [done()])
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == ""  # type: ignore[union-attr]
    assert names.count("content_block_start") == 1


def test_a_forced_call_left_as_text_becomes_the_call() -> None:
    request = parse(MessagesRequest, {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}],
                                      "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                                      "tool_choice": {"type": "tool", "name": "get_weather"}})
    plan = request.native(thinks=False).plan
    assert plan.forced == {"get_weather"} and isinstance(plan.format, dict)
    _, message = fold(Reply("m", [], plan), [chat_chunk('{"name": "get_weather", '), chat_chunk('"arguments": {"city": "Rome"}}'),
                                            done()])
    assert [b.type for b in message.content] == ["tool_use"] and message.content[0].input == {"city": "Rome"}  # type: ignore[union-attr]
    assert ToolChoice("none").constrain(plan.tools, None).tools is None


def test_the_conversation_becomes_native_chat() -> None:
    request = parse(MessagesRequest, {"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "Be kind."}],
                                      "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "tool", "signature": ""},
                                          {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Oslo"}}]},
        {"role": "system", "content": "Reminder: be brief."},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "timeout"}]},
                                     {"type": "text", "text": "And?", "cache_control": {"type": "ephemeral"}}]}]})
    messages = request.native(thinks=True).messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "system", "tool", "user"]
    assert messages[2]["thinking"] == "tool" and messages[2]["tool_calls"][0]["function"]["arguments"] == {"c": "Oslo"}
    assert messages[4]["content"] == "Error: timeout" and messages[4]["tool_name"] == "w"
    assert request.native(thinks=False).think is None  # a model that cannot think answers without, never a 400
    thinking = parse(MessagesRequest, {"model": "m", "max_tokens": 9000, "messages": [{"role": "user", "content": "x"}],
                                       "thinking": {"type": "enabled", "budget_tokens": 2048}})
    assert thinking.native(thinks=True).think is True and thinking.options(4096)["num_predict"] == 4096


def _slow(items: list[dict[str, Any] | Exception], wait: float) -> Iterator[dict[str, Any]]:
    time.sleep(wait)
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


def _sse(text: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in text:
        name, data = event.strip().split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_pings_while_the_prompt_is_prefilled_then_the_reply(app: Flask) -> None:
    with app.app_context():
        pump = Pump(app, None, _slow([chat_chunk("Hi"), done()], 0.35))
        first = pump.prime(0.01)  # nothing yet: the response starts with message_start and pings
        assert first is None
        streamed = _sse(list(events(Reply("m", [], PLAIN), pump, first, 0.1)))
    names = [n for n, _ in streamed]
    assert names[0] == "message_start" and names[1] == "ping" and names.count("ping") >= 2
    assert names[-1] == "message_stop" and "content_block_delta" in names
    for name, data in streamed:  # a ping has no type in the SDK (it skips them): {"type": "ping"}
        assert data == {"type": "ping"} if name == "ping" else EVENTS.validate_python(data).type == name


def test_an_error_after_the_first_byte_is_an_error_event(app: Flask) -> None:
    stopped: list[bool] = []
    with app.app_context():
        pump = Pump(app, None, _slow([chat_chunk("Hi"), WorkerUnavailable("worker w1 stopped responding")], 0.0))
        first = pump.prime(1.0)
        streamed = _sse(list(events(Reply("m", [], PLAIN), pump, first, 1.0, lambda: stopped.append(True))))
    assert streamed[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "worker w1 stopped responding"},
                                      "request_id": streamed[-1][1]["request_id"]})
    assert stopped == [True]  # whatever failed, the worker is told to stop (a no-op for one that already has)


def test_what_claude_code_sends_besides_is_accepted_and_mapped() -> None:
    request = parse(MessagesRequest, {
        "model": "m", "max_tokens": 32000, "output_config": {"effort": "xhigh"}, "context_management": {"edits": []},
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "messages": [{"role": "user", "content": [
            {"type": "document", "title": "README", "source": {"type": "text", "media_type": "text/plain", "data": "Hi"}},
            {"type": "mid_conv_system", "content": [{"type": "text", "text": "Be brief."}]},
            {"type": "redacted_thinking", "data": "xx"}, {"type": "server_tool_use", "id": "s", "name": "web_search"}]}]})
    native = request.native(thinks=True)
    assert [t["function"]["name"] for t in native.plan.tools or []] == ["Bash"]  # the server tool is dropped
    assert native.think == "high"  # effort xhigh, with no thinking field
    assert [m["role"] for m in native.messages] == ["system", "user"] and native.messages[1]["content"] == "README\n\nHi"
    assert request.options(8192)["num_predict"] == 8192  # capped at the model's context


def test_a_client_that_goes_away_stops_the_worker(app: Flask) -> None:
    stopped: list[bool] = []
    with app.app_context():
        pump = Pump(app, None, _slow([chat_chunk("Hi"), chat_chunk(" there"), done()], 0.2))
        body = events(Reply("m", [], PLAIN), pump, None, 1.0, lambda: stopped.append(True))
        assert next(body).startswith("event: message_start")
        body.close()  # what the WSGI server does when the client disconnects
    assert stopped == [True] and pump.quit.is_set()
