"""The OpenAI stream translation (corral.wire.openai.stream_chunks): native Ollama chunks in, OpenAI's chunk
objects out, as the official openai client reads them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from corral.wire.openai import stream_chunks


def native(shape: str, texts: list[str], **final: Any) -> Iterator[dict[str, Any]]:
    key = "message" if shape == "chat" else "response"
    for text in texts:
        yield {key: {"role": "assistant", "content": text} if shape == "chat" else text, "done": False}
    yield {key: {"role": "assistant", "content": ""} if shape == "chat" else "", "done": True, **final}


def test_chat_stream_opens_with_the_role_and_ends_with_a_reason_and_usage() -> None:
    out = list(stream_chunks("chat", "m", True, native("chat", ["Hel", "lo"], done_reason="stop",
                                                          prompt_eval_count=5, eval_count=2)))
    assert {o["object"] for o in out} == {"chat.completion.chunk"} and len({o["id"] for o in out}) == 1
    deltas = [o["choices"][0]["delta"] for o in out if o["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "Hel"} and deltas[1] == {"content": "lo"}
    assert [o["choices"][0]["finish_reason"] for o in out if o["choices"]] == [None, None, "stop"]
    assert out[-1]["choices"] == [] and out[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2,
                                                             "total_tokens": 7}


def test_a_length_stop_is_reported_and_no_usage_unless_asked() -> None:
    out = list(stream_chunks("generate", "m", False, native("generate", ["a"], done_reason="length")))
    assert [o["choices"][0]["text"] for o in out] == ["a", ""]
    assert out[-1]["choices"][0]["finish_reason"] == "length" and all("usage" not in o for o in out)


def test_tool_calls_stream_as_deltas_and_finish_as_tool_calls() -> None:
    call = {"function": {"name": "weather", "arguments": {"city": "Oslo"}}, "index": 0, "id": "call_1"}
    chunks = iter([
        {"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
    ])
    out = list(stream_chunks("chat", "m", False, chunks))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    [sent] = out[1]["choices"][0]["delta"]["tool_calls"]
    assert sent["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_closing_the_translation_closes_the_native_stream() -> None:
    closed = []

    def source() -> Iterator[dict[str, Any]]:
        try:
            yield from native("chat", ["a", "b", "c"])
        finally:
            closed.append(True)

    stream = stream_chunks("chat", "m", False, source())
    next(stream)
    stream.close()  # the client went away
    assert closed == [True]
