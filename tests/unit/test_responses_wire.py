"""corral/wire/openai_responses*.py without a worker: input items into native messages, and native chunks into
the stream's events in the documented order (each validated against the openai SDK's event types), for the
replies a tiny model rarely gives: thinking, text then a tool call, a failure after the first byte."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from corral.errors import GenerationFailed
from corral.toolchoice import Constrained, ToolChoice
from corral.wire.openai_responses import ResponsesRequest, conversation, normalize_items
from corral.wire.openai_responses_output import Draft, stream_events
from tests.helpers import chat_chunk

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
CALL = {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}


def done(reason: str = "stop") -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": reason,
            "prompt_eval_count": 7, "eval_count": 5}


def run(chunks: list[dict[str, Any] | None] | Iterator[dict[str, Any]], plan: Constrained | None = None,
        **body: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    kept: list[dict[str, Any]] = []
    draft = Draft(ResponsesRequest.model_validate({"model": "m", "input": "hi", **body}))
    events = list(stream_events(draft, iter(chunks), plan or Constrained(None, None), kept.append))
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    Response.model_validate(events[-1]["response"])
    assert kept == [events[-1]["response"]]  # what is stored is what the terminal event says
    return events, events[-1]["response"]["output"]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def test_reasoning_then_text() -> None:
    events, output = run([chat_chunk(thinking="Hm, "), chat_chunk(thinking="hi."), chat_chunk("Hel"), chat_chunk("lo"), done()],
                         include=["reasoning.encrypted_content"])
    assert kinds(events) == [
        "created", "in_progress",
        "output_item.added", "reasoning_summary_part.added", "reasoning_summary_text.delta",
        "reasoning_summary_text.delta", "reasoning_summary_text.done", "reasoning_summary_part.done", "output_item.done",
        "output_item.added", "content_part.added", "output_text.delta", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done", "completed"]
    assert output[0]["summary"] == [{"type": "summary_text", "text": "Hm, hi."}]
    assert output[0]["encrypted_content"] == "Hm, hi."
    assert output[1]["content"][0]["text"] == "Hello" and output[1]["status"] == "completed"
    assert events[-1]["response"]["usage"]["total_tokens"] == 12


def test_a_silent_worker_gets_keep_alives() -> None:
    events, _ = run([None, None, chat_chunk("Hi"), None, done()])
    assert kinds(events) == ["created", "in_progress", "in_progress", "in_progress", "output_item.added",
                             "content_part.added", "output_text.delta", "in_progress", "output_text.done",
                             "content_part.done", "output_item.done", "completed"]


def test_text_before_a_tool_call_is_kept() -> None:
    events, output = run([chat_chunk("Let me check."), chat_chunk(calls=[CALL]), done()])
    assert [i["type"] for i in output] == ["message", "function_call"]
    assert output[1] == {"id": output[1]["id"], "type": "function_call", "status": "completed", "call_id": "call_1",
                         "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert kinds(events)[-5:] == ["output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                                  "output_item.done", "completed"]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1]


def test_a_forced_call_left_as_text_comes_back_as_the_call() -> None:
    plan = ToolChoice("required").constrain([{"type": "function", "function": {"name": "get_weather"}}], None)
    _, output = run([chat_chunk('{"name": "get_weather", '), chat_chunk('"arguments": {"city": "Oslo"}}'), done()], plan)
    assert [(i["type"], i["name"]) for i in output] == [("function_call", "get_weather")]


def test_a_length_stop_is_incomplete() -> None:
    events, output = run([chat_chunk("Once upon"), done("length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert output[0]["status"] == "incomplete"


def test_a_failure_after_the_first_byte_is_response_failed() -> None:
    def failing() -> Iterator[dict[str, Any]]:
        yield chat_chunk("Par")
        raise GenerationFailed("the worker running this request died")

    events, output = run(failing())
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "the worker running this request died"}
    assert kinds(events)[-5:] == ["output_text.delta", "output_text.done", "content_part.done", "output_item.done",
                                  "failed"]
    assert output[0]["content"][0]["text"] == "Par" and output[0]["status"] == "incomplete"  # what was sent stays


def test_items_into_native_messages() -> None:
    items = normalize_items([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "}, {"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Use the tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "18C"}]},
        {"type": "web_search_call", "id": "ws_1", "status": "completed"},
    ])
    assert all(item["id"] for item in items) and items[1]["content"][1]["text"] == "Paris?"
    assert conversation(items, "You are terse.") == [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "thinking": "Use the tool.",
         "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "c1", "name": "get_weather", "tool_name": "get_weather"},
    ]
    assert normalize_items("hi")[0]["content"] == [{"type": "input_text", "text": "hi"}]


def test_a_store_that_fails_still_ends_the_stream(caplog: Any) -> None:
    def broken(_: dict[str, Any]) -> None:
        raise OSError("disk full")

    draft = Draft(ResponsesRequest.model_validate({"model": "m", "input": "hi"}))
    events = list(stream_events(draft, iter([chat_chunk("Hi"), done()]), Constrained(None, None), broken))
    assert events[-1]["type"] == "response.completed" and "could not keep response" in caplog.text
