"""What happens when a request does not fit ``num_ctx``, as in Ollama: a chat loses whole messages, oldest first,
keeping its system prompt and last message; ``truncate: false`` is a 400 instead; a generation goes on past the
context end by shifting it (``shift: false`` stops it with ``done_reason: "length"``)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.helpers import MODEL

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
HISTORY = [
    {"role": "user" if i % 2 == 0 else "assistant",
     "content": f"Turn {i}: " + "the quick brown fox jumps over the lazy dog " * 3}
    for i in range(6)
]
LAST = {"role": "user", "content": "What is 2+2?"}


def chat(base_url: str, messages: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    options = {"num_predict": 1, "temperature": 0, **extra.pop("options", {})}
    return httpx.post(base_url + "/api/chat", timeout=120,
                      json={"model": MODEL, "messages": messages, "stream": False, "options": options, **extra})


def test_a_long_chat_loses_whole_messages_oldest_first(base_url: str) -> None:
    # The prompt size of the system prompt, the last k messages of the history and the question, for every k.
    sizes = [chat(base_url, [SYSTEM, *HISTORY[len(HISTORY) - k:], LAST]).json()["prompt_eval_count"]
             for k in range(len(HISTORY) + 1)]
    assert sizes == sorted(sizes) and sizes[-1] > 160
    num_ctx = (sizes[2] + sizes[3]) // 2  # room for the last two messages of the history, not three
    fitted = chat(base_url, [SYSTEM, *HISTORY, LAST], options={"num_ctx": num_ctx}).json()
    assert fitted["prompt_eval_count"] == sizes[2]  # whole messages went, the system prompt and question stayed
    refused = chat(base_url, [SYSTEM, *HISTORY, LAST], options={"num_ctx": num_ctx}, truncate=False)
    assert (refused.status_code, refused.json()) == (400, {"error": "the input length exceeds the context length"})
    fits = chat(base_url, [SYSTEM, LAST], options={"num_ctx": num_ctx}, truncate=False)
    assert fits.status_code == 200 and fits.json()["prompt_eval_count"] == sizes[0]


def test_generation_goes_on_past_the_context_by_shifting_it(base_url: str) -> None:
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True, "stream": False,
            "options": {"num_ctx": 64, "num_predict": 90, "temperature": 0}}
    shifted = httpx.post(base_url + "/api/generate", json=body, timeout=120).json()
    assert shifted["eval_count"] == 90 > 64 and shifted["done_reason"] == "length"
    stopped = httpx.post(base_url + "/api/generate", json={**body, "shift": False}, timeout=120).json()
    assert stopped["done_reason"] == "length" and stopped["prompt_eval_count"] + stopped["eval_count"] == 64
    assert shifted["response"].startswith(stopped["response"])  # the same text until the context was full
