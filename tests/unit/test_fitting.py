"""Fitting a chat into num_ctx (workers/fitting.py): the messages Ollama's chatPrompt keeps, in linear time."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import GenerationFailed
from workers.fitting import Rendered, fit_messages


class ChatML:
    """A ChatML-like template over a word tokenizer (a word is a token), counting its renders and counts."""

    def __init__(self) -> None:
        self.renders = 0
        self.rendered_tokens = 0
        self.counts = 0

    def render(self, messages: list[dict[str, Any]]) -> Rendered:
        self.renders += 1
        text = "".join(f"<start> {m['role']} {m['content']} <end> " for m in messages) + "<start> assistant"
        tokens = list(range(len(text.split())))
        self.rendered_tokens += len(tokens)
        return tokens, [], text, None

    def count(self, text: str) -> int:
        self.counts += 1
        return len(text.split())


def chatprompt(template: ChatML, messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Ollama's chatPrompt, as written in server/prompt.go: newest first, one render per message tried."""
    n = len(messages) - 1
    for i in range(n - 1, -1, -1):
        system = [m for m in messages[:i] if m["role"] == "system"]
        if len(template.render(system + messages[i:])[0]) > budget:
            break
        n = i
    return [m for m in messages[:n] if m["role"] == "system"] + messages[n:]


def chat(n: int, *, system: bool = True) -> list[dict[str, Any]]:
    roles = ("user", "assistant")
    head = [{"role": "system", "content": "be brief"}] if system else []
    return head + [{"role": roles[i % 2], "content": " ".join(["w"] * (1 + i % 5))} for i in range(n)]


@pytest.mark.parametrize("n,budget", [(3, 1000), (50, 60), (200, 256), (2000, 256), (500, 4096), (40, 14)])
def test_keeps_what_ollamas_chatprompt_keeps(n: int, budget: int) -> None:
    messages = chat(n)
    ours = ChatML()
    tokens, _, text, _ = fit_messages(ours.render, messages, budget, truncate=True, count=ours.count)
    assert text == ChatML().render(chatprompt(ChatML(), messages, budget))[2]


def test_a_long_chat_costs_a_few_renders_of_about_num_ctx_and_one_count_per_kept_message() -> None:
    messages = chat(20_000)
    template = ChatML()
    tokens, _, _, _ = fit_messages(template.render, messages, 256, truncate=True, count=template.count)
    assert len(tokens) <= 256
    assert template.renders <= 4  # the always-kept part, the template probe, the choice (and one more at most)
    assert template.rendered_tokens < 4 * 256
    assert template.counts < 100  # the messages tried, never all 20,000


def test_a_client_that_goes_away_stops_the_counting() -> None:
    template = ChatML()
    with pytest.raises(GenerationFailed, match="cancelled"):
        fit_messages(template.render, chat(20_000), 100_000, truncate=True, count=template.count,
                     cancelled=lambda: True)
    assert template.counts < 300


def test_without_truncate_or_when_it_fits_the_chat_is_rendered_once_whole() -> None:
    template = ChatML()
    messages = chat(50)
    assert fit_messages(template.render, messages, 10, truncate=False, count=template.count)[2] == \
        ChatML().render(messages)[2]
    assert template.renders == 1
    template = ChatML()
    assert fit_messages(template.render, messages, 10_000, truncate=True, count=template.count)[2] == \
        ChatML().render(messages)[2]
    assert template.renders == 1


def test_a_last_message_past_num_ctx_is_kept_with_the_system_messages() -> None:
    template = ChatML()
    messages = chat(10) + [{"role": "user", "content": " ".join(["long"] * 500)}]
    text = fit_messages(template.render, messages, 100, truncate=True, count=template.count)[2]
    assert text.startswith("<start> system be brief <end> <start> user long")


@pytest.mark.parametrize("messages", [
    [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(20_000)],  # no text: not free either
    [{"role": "system", "content": f"rule {i}"} for i in range(20_000)] + [{"role": "user", "content": "hi"}],
])
def test_chats_long_in_messages_not_text_are_never_rendered_whole(messages: list[dict[str, Any]]) -> None:
    """The review's cases: 20,000 empty messages (their text adds up to nothing), 20,000 system messages (always
    kept by Ollama): either was rendered and tokenized whole."""
    template = ChatML()
    tokens, _, _, _ = fit_messages(template.render, messages, 256, truncate=True, count=template.count)
    assert len(tokens) <= 256 or template.renders <= 2
    assert template.rendered_tokens < 20 * 256
