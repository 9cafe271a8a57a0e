"""The Responses API with the official clients, unmodified, against the session's real worker and server: the
``openai`` SDK's ``responses.create``, ``responses.stream``, ``previous_response_id`` chains, ``retrieve``,
``delete`` and ``input_items.list``, every reply's raw JSON validated against the SDK's own types; and the
``openai-agents`` SDK's ``Runner`` through one function-tool round trip.

The tool tests use the default smollm2, whose catalog TEMPLATE (Ollama's library one) reads ``.Tools``; a 135M
model does not decide to call a tool by itself, so they force the call with ``tool_choice``, which is what they
test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses.response_item import ResponseItem
from pydantic import TypeAdapter

from tests.helpers import MODEL

WEATHER = {
    "type": "function", "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 16}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
ITEMS: TypeAdapter[Any] = TypeAdapter(ResponseItem)


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tools_model(base_url: str) -> str:
    """The default smollm2: the catalog gives it Ollama's library TEMPLATE, which reads ``.Tools``."""
    shown = httpx.post(base_url + "/api/show", json={"model": MODEL}, timeout=30).json()
    assert "tools" in shown["capabilities"]
    return MODEL


def raw_create(oai: OpenAI, **body: Any) -> dict[str, Any]:
    """``responses.create``'s raw JSON, checked against the SDK's ``Response`` type (strictly, not constructed)."""
    raw = oai.responses.with_raw_response.create(**body)
    data: dict[str, Any] = json.loads(raw.text)
    Response.model_validate(data)
    assert "output_text" not in data  # an SDK-side property, not a wire field
    return data


def sse_events(base_url: str, **body: Any) -> list[dict[str, Any]]:
    """A stream's raw events, each checked against the SDK's event union and its ``event:`` line."""
    events = []
    with httpx.stream("POST", base_url + "/v1/responses", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                assert event["type"] == name
                EVENTS.validate_python(event)
                events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_create_answers_in_the_sdks_shape(oai: OpenAI) -> None:
    data = raw_create(oai, model=MODEL, input="Say hello.", instructions="Be brief.", metadata={"run": "1"}, **GREEDY)
    assert data["id"].startswith("resp_") and data["object"] == "response" and data["model"] == MODEL
    assert data["instructions"] == "Be brief." and data["metadata"] == {"run": "1"} and data["store"] is True
    [message] = data["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["content"][0]["text"]
    usage = data["usage"]
    assert usage["output_tokens"] <= 16 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    if usage["output_tokens"] == 16:  # a length stop is incomplete, as OpenAI reports it
        assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    reply = oai.responses.create(model=MODEL, input="Say hello.", instructions="Be brief.", **GREEDY)
    assert reply.output_text == message["content"][0]["text"]  # greedy: the same text again
    short = oai.responses.create(model=MODEL, input="Count to twenty.", temperature=0, max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert short.usage.output_tokens == 3  # type: ignore[union-attr]


def test_stream_events_in_order_and_the_sdks_helper(oai: OpenAI, base_url: str) -> None:
    body = {"model": MODEL, "input": [{"role": "developer", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}],
            "temperature": 0, "max_output_tokens": 64}  # room to finish: the SDK's helper wants response.completed
    events = sse_events(base_url, **body)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1]["type"]]
    assert events[-1]["type"] == "response.completed"
    assert len(deltas) == kinds.count("response.output_text.delta") > 1
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(deltas) == events[-4]["text"]
    with oai.responses.stream(**body) as stream:  # type: ignore[arg-type]
        streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        whole = stream.get_final_response()
    assert whole.output_text == streamed == "".join(deltas)
    assert oai.responses.retrieve(whole.id).output_text == streamed  # a streamed response is stored too


def test_previous_response_id_chains_and_stored_responses(oai: OpenAI) -> None:
    first = oai.responses.create(model=MODEL, input="My name is Ada.", **GREEDY)
    second = oai.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id, **GREEDY)
    alone = oai.responses.create(model=MODEL, input="What is my name?", store=False, **GREEDY)
    assert second.previous_response_id == first.id
    # the first turn (its input and its reply) went in front of the new one, server-side
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # type: ignore[union-attr]
    got = oai.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    Response.model_validate(json.loads(oai.responses.with_raw_response.retrieve(second.id).text))
    items = oai.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What is my name?"  # type: ignore[union-attr]
    for raw in json.loads(oai.responses.input_items.with_raw_response.list(first.id).text)["data"]:
        ITEMS.validate_python(raw)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(alone.id)  # store: false keeps nothing
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as err:  # the chain now misses its first turn
        oai.responses.create(model=MODEL, input="And?", previous_response_id=second.id, **GREEDY)
    assert err.value.code == "previous_response_not_found"


def test_json_schema_format_is_enforced(oai: OpenAI) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 10}}, "required": ["colour"]}
    data = raw_create(oai, model=MODEL, input="Name a colour.", temperature=0, max_output_tokens=40,
                      text={"format": {"type": "json_schema", "name": "colour", "schema": schema}})
    assert set(json.loads(data["output"][0]["content"][0]["text"])) == {"colour"}


def test_forced_tool_call_then_its_output(oai: OpenAI, base_url: str, tools_model: str) -> None:
    ask = "What is the weather in Paris?"
    called = raw_create(oai, model=tools_model, input=ask, tools=[WEATHER], tool_choice="required", temperature=0,
                        max_output_tokens=48)
    [call] = called["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")
    assert set(json.loads(call["arguments"])) == {"city"} and called["status"] == "completed"
    answer = raw_create(oai, model=tools_model, previous_response_id=called["id"], tools=[WEATHER], **GREEDY,
                        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "18C, sunny"}])
    assert answer["output"][-1]["type"] == "message" and answer["output"][-1]["content"][0]["text"]
    events = sse_events(base_url, model=tools_model, input=ask, tools=[WEATHER], temperature=0, max_output_tokens=48,
                        tool_choice={"type": "function", "name": "get_weather"})
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[4]["name"] == "get_weather" and events[-1]["response"]["output"][0]["arguments"] == events[4]["arguments"]
    # tool_choice none: the tools are not offered to the model, and the reply is text
    plain = raw_create(oai, model=tools_model, input=ask, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert [i["type"] for i in plain["output"]] == ["message"]


def test_agents_sdk_runner_completes_a_function_tool_round_trip(base_url: str, tools_model: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no trace export to OpenAI
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"18C and sunny in {city}"

    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0) as client:
            agent = Agent(
                name="weather", instructions="Answer with the weather.", tools=[get_weather],
                model=OpenAIResponsesModel(model=tools_model, openai_client=client),
                # the first turn must call the tool; the Runner resets the choice to auto after it
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=48),
            )
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=3)

    result = asyncio.run(run())
    assert len(seen) == 1 and seen[0]
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"


def test_a_batch_of_responses_lines_answers_as_the_sync_route(oai: OpenAI) -> None:
    from tests.integration.test_openai import jsonl, upload, wait_batch

    body = {"model": MODEL, "input": "Name a fruit.", "instructions": "One word.", **GREEDY}
    lines = [{"custom_id": "fruit", "method": "POST", "url": "/v1/responses", "body": body},
             {"custom_id": "chained", "method": "POST", "url": "/v1/responses",
              "body": {**body, "previous_response_id": "resp_x"}}]
    failed = wait_batch(oai, oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/responses",
                                                completion_window="24h").id)
    assert failed.status == "failed" and failed.errors.data[0].param == "body.previous_response_id"  # type: ignore[union-attr]
    batch = oai.batches.create(input_file_id=upload(oai, lines[:1]), endpoint="/v1/responses", completion_window="24h")
    done = wait_batch(oai, batch.id)
    assert done.status == "completed", done
    [line] = jsonl(oai.files.content(done.output_file_id).text)  # type: ignore[arg-type]
    reply = Response.model_validate(line["response"]["body"])
    assert reply.id.startswith("resp_") and reply.instructions == "One word."
    assert reply.output_text == oai.responses.create(**body, store=False).output_text  # greedy: as the sync route


def test_background_responses_are_durable_jobs_polled_and_cancelled(oai: OpenAI, base_url: str) -> None:
    from harness.stack import wait_for

    queued = oai.responses.create(model=MODEL, input="Say hello.", background=True, **GREEDY)
    assert queued.status in ("queued", "in_progress") and queued.background is True and queued.output == []
    state: dict[str, Any] = {}

    def ended(ident: str) -> bool:
        state["r"] = oai.responses.retrieve(ident)
        return state["r"].status not in ("queued", "in_progress")

    wait_for(lambda: ended(queued.id), 120, "the background response", interval=0.3)
    done = state["r"]
    assert done.status in ("completed", "incomplete") and done.output_text
    assert done.output_text == oai.responses.create(model=MODEL, input="Say hello.", store=False, **GREEDY).output_text
    Response.model_validate(json.loads(oai.responses.with_raw_response.retrieve(queued.id).text))
    long = oai.responses.create(model=MODEL, input="Write a long story.", background=True, temperature=0,
                                max_output_tokens=2000)
    cancelled = oai.responses.cancel(long.id)
    wait_for(lambda: ended(long.id), 60, "the cancelled response", interval=0.3)
    assert cancelled.status in ("cancelled", "queued", "in_progress") and state["r"].status == "cancelled"
    assert oai.responses.cancel(queued.id).status == done.status  # an ended response stays as it ended
    oai.responses.delete(queued.id)  # and its job goes with it: its item held the conversation
    assert httpx.get(f"{base_url}/api/jobs/{queued.id}").status_code == 404


def test_a_codex_shaped_turn_streams_to_completion(base_url: str, tools_model: str) -> None:
    shell = {"type": "function", "name": "shell", "description": "Run a command", "strict": False,
             "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                            "required": ["command"]}}
    body = {
        "model": tools_model, "instructions": "You are a coding agent. " * 5, "store": False, "stream": True,
        "tools": [shell, {"type": "custom", "name": "apply_patch", "description": "Patch files"}, {"type": "web_search"}],
        "tool_choice": "auto", "parallel_tool_calls": False, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "thread-1", "text": {"verbosity": "low"}, "temperature": 0, "max_output_tokens": 24,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "<permissions>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List the files."}]},
            {"type": "reasoning", "summary": [], "content": None, "encrypted_content": "I should run ls."},
            {"type": "function_call", "name": "shell", "arguments": '{"command": ["ls"]}', "call_id": "call_a"},
            {"type": "function_call_output", "call_id": "call_a", "output": "README.md\nsrc"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Which one is the readme?"}]},
        ],
    }
    events = sse_events(base_url, **{k: v for k, v in body.items() if k != "stream"})
    assert events[0]["type"] == "response.created" and events[-1]["type"] in ("response.completed",
                                                                              "response.incomplete")
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done and done == events[-1]["response"]["output"]  # Codex keeps what output_item.done says


def test_input_tokens_counts_what_create_takes(oai: OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": "Count these words.", "instructions": "Be brief."}
    counted = oai.responses.input_tokens.count(**body)
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == oai.responses.create(**body, store=False, **GREEDY).usage.input_tokens  # type: ignore[union-attr]


def test_a_thinking_models_reasoning_items(oai: OpenAI, base_url: str) -> None:
    from tests.integration.test_thinking import TEMPLATE as THINKING

    r = httpx.post(base_url + "/api/create", timeout=120,
                   json={"model": "thinker-responses", "from": MODEL, "template": THINKING, "stream": False})
    assert r.json() == {"status": "success"}, r.text
    try:  # SmolLM2 never closes the block it is given: within 10 tokens, all it says is thinking
        body = {"model": "thinker-responses", "input": "What is 17 times 3?", "reasoning": {"effort": "high"},
                "temperature": 0, "max_output_tokens": 10, "include": ["reasoning.encrypted_content"]}
        data = raw_create(oai, **body)
        [reasoning] = data["output"]
        assert reasoning["type"] == "reasoning" and reasoning["summary"][0]["text"].strip()
        assert reasoning["encrypted_content"] == reasoning["summary"][0]["text"] and data["status"] == "incomplete"
        events = sse_events(base_url, **body)
        assert [e["type"] for e in events][2:5] == ["response.output_item.added", "response.reasoning_summary_part.added",
                                                    "response.reasoning_summary_text.delta"]
        assert events[-1]["response"]["output"][0]["summary"] == reasoning["summary"]
        off = raw_create(oai, **{**body, "reasoning": {"effort": "none"}})
        assert [i["type"] for i in off["output"]] == ["message"]
    finally:
        httpx.request("DELETE", base_url + "/api/delete", json={"model": "thinker-responses"}, timeout=30)


def test_truncation_disabled_refuses_what_auto_fits(oai: OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL, "input": [{"role": "user", "content": "word " * 100},
                                                      {"role": "user", "content": "Say hi."}],
                            "max_output_tokens": 4, "extra_body": {"options": {"num_ctx": 96}}}
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's default: an over-long input is a 400
        oai.responses.create(**body)
    assert err.value.body["message"] == "the input length exceeds the context length"  # type: ignore[index]
    assert err.value.code == "context_length_exceeded"  # what Codex acts on (it compacts its history)
    fitted = oai.responses.create(**body, truncation="auto")  # the oldest turn dropped, as Ollama fits a chat
    assert fitted.status in ("completed", "incomplete") and fitted.usage.input_tokens <= 96  # type: ignore[union-attr]
