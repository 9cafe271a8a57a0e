"""Fitting a chat into ``num_ctx``: whole messages dropped from the oldest, keeping the system messages and the
last message, as Ollama's ``chatPrompt`` does, in time linear in what is kept.

Ollama renders and tokenizes the chat once per message it tries, and so did corral (from the oldest side: 2,000
tiny messages against ``num_ctx`` 256 took 240 s of worker time, while other chats on that worker slowed
down).  Tokenizing even once is not cheap on a long chat: llama.cpp's tokenizer took 16 s for the 900 kB prompt
of 20,000 tiny ChatML messages (it splits the text at every special token).  So a chat whose text is long for
``num_ctx`` is never tokenized whole.  Walking back from the newest message, as ``chatPrompt`` does, each
message's own text is counted once; what the template adds around a message comes from one render of the
newest few; the walk stops at the first message that does not fit.  The choice is then rendered for real, and
when the estimate was short (a template that adds more to some roles), more of the oldest kept messages go
until it fits.  Every render after the first has about ``num_ctx`` tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from corral.errors import GenerationFailed
from workers.media import MediaPrompt

log = logging.getLogger(__name__)

Rendered = tuple[list[int], list[str], str, MediaPrompt | None]  # tokens, stop strings, text, images
Render = Callable[[list[dict[str, Any]]], Rendered]
CANCEL_CHECK_EVERY = 256  # messages counted between two looks at the client's cancel flag
SAMPLE = 8  # the newest messages whose render gives the template's tokens per message
WHOLE_BYTES_PER_TOKEN = 8  # a chat of at most this many bytes per num_ctx token is tokenized whole first
MESSAGE_BYTES = 16  # what a template wraps around a message, at least, for that estimate (an empty one is not free)


def fit_messages(
    render: Render, messages: Sequence[dict[str, Any]], budget: int, *, truncate: bool,
    count: Callable[[str], int], cancelled: Callable[[], bool] | None = None,
) -> Rendered:
    """The rendered chat with as many of its newest messages as fit ``budget`` tokens; the images of the
    messages dropped go with them.  ``count`` gives a message text's tokens; ``cancelled`` is asked while
    counting, and a client that has gone ends the work (:class:`GenerationFailed`)."""
    chat = list(messages)
    long = budget * WHOLE_BYTES_PER_TOKEN
    if not truncate or len(chat) < 2 or sum(len(message_text(m)) + MESSAGE_BYTES for m in chat) <= long:
        full = render(chat)
        if len(full[0]) <= budget or not truncate or len(chat) < 2:
            return full
        _close(full)
    last = len(chat) - 1
    system = _newest_that_fit([i for i in range(last) if chat[i].get("role") == "system"], chat, long)
    middle = [i for i in range(last) if chat[i].get("role") != "system"]

    def pick(indices: list[int]) -> list[dict[str, Any]]:
        return [chat[i] for i in sorted(system + indices + [last])]

    base = render(pick([]))  # what is always kept: the system messages and the last message
    if len(base[0]) >= budget or not middle:
        log.info("chat of %d messages truncated to its system messages and last message to fit num_ctx=%d",
                 len(chat), budget)
        return base
    _close(base)
    costs: dict[int, int] = {}

    def cost(k: int) -> int:  # the k-th middle message's own tokens, counted once
        if k not in costs:
            if cancelled is not None and len(costs) % CANCEL_CHECK_EVERY == 0 and cancelled():
                raise GenerationFailed("cancelled: the client went away")
            costs[k] = count(message_text(chat[middle[k]]))
        return costs[k]

    sample = list(range(max(0, len(middle) - SAMPLE), len(middle)))
    probe = render(pick([middle[k] for k in sample]))
    _close(probe)
    # (at least a token: a sample whose text counts more alone than rendered must not make messages free)
    overhead = max(1.0, (len(probe[0]) - len(base[0]) - sum(cost(k) for k in sample)) / len(sample))
    room, start = float(budget - len(base[0])), len(middle)
    while start > 0 and room >= cost(start - 1) + overhead:
        room -= cost(start - 1) + overhead
        start -= 1
    while True:
        rendered = render(pick(middle[start:]))
        if len(rendered[0]) <= budget or start >= len(middle):
            break
        _close(rendered)
        excess, dropped = len(rendered[0]) - budget, 0.0
        while start < len(middle) and dropped < excess:  # at least one more message goes each time
            dropped += cost(start) + overhead
            start += 1
    log.info("chat of %d messages truncated to its last %d to fit num_ctx=%d", len(chat), len(middle) - start + 1,
             budget)
    return rendered


def _newest_that_fit(indices: list[int], chat: list[dict[str, Any]], limit: int) -> list[int]:
    """The system messages kept: all of them, as Ollama keeps them, unless their text alone is long for
    ``num_ctx`` (thousands of them): then the newest whose text fits, so the always-kept part stays small."""
    kept: list[int] = []
    size = 0
    for i in reversed(indices):
        size += len(message_text(chat[i])) + MESSAGE_BYTES
        if size > limit and kept:
            break
        kept.append(i)
    return kept[::-1]


def message_text(message: dict[str, Any]) -> str:
    """The text a message brings to the prompt, besides what its template wraps it in."""
    text = str(message.get("content") or "")
    if message.get("thinking"):
        text += str(message["thinking"])
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"])
    return text


def _close(rendered: Rendered) -> None:
    if rendered[3] is not None:
        rendered[3].close()
