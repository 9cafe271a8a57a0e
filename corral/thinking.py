"""Reasoning models' thinking, kept out of ``content``: a request's ``think`` value, and the splitter that routes
the text between the model's thinking tags to ``thinking``, as Ollama's ``thinking`` parser does.

The tags come from the model's template (corral/modelstore/gotemplate.py ``thinking_tags``), or are ``<think>`` and
``</think>`` for a GGUF chat template that has them (Qwen3, DeepSeek-R1, SmolLM3).  A prompt that already ends
with the opening tag (DeepSeek-R1's generation prompt, or a template that opens the block for the model) starts
inside the thinking.
"""

from __future__ import annotations

from typing import Any

from corral.errors import BadRequest

THINK_LEVELS = ("high", "medium", "low", "max")
DEFAULT_TAGS = ("<think>", "</think>")


def check_think(value: Any) -> bool | str | None:
    """A ``think`` value as Ollama's ``ThinkValue`` accepts it (a bool, or a level), with Ollama's messages."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in THINK_LEVELS:
            raise BadRequest(f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)')
        return value
    raise BadRequest('think must be a boolean or string ("high", "medium", "low", "max", true, or false)')


def think_from_effort(effort: Any) -> bool | str | None:
    """OpenAI's ``reasoning_effort`` (or ``reasoning.effort``) as a think value, clamped as Ollama's OpenAI layer
    clamps it: ``minimal`` is ``low``, ``xhigh`` and ``ultra`` are ``max``, ``none`` is off."""
    mapping: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                                      "max": "max", "xhigh": "max", "ultra": "max"}
    if effort is None or effort == "":
        return None
    if not isinstance(effort, str) or effort not in mapping:
        raise BadRequest(f'invalid reasoning value: "{effort}" (must be "minimal", "low", "medium", "high", "xhigh", '
                         '"ultra", "max", or "none")')
    return mapping[effort]


class ThinkingSplitter:
    """Feed generated text as it comes; get back (thinking, content) pieces.  A tag split across two pieces is
    held until it is whole, so nothing of a tag reaches either side; whitespace around the thinking is dropped."""

    def __init__(self, opening: str, closing: str, *, inside: bool = False) -> None:
        self.opening, self.closing = opening, closing
        self.state = "thinking" if inside else "start"  # start -> thinking -> after -> content
        self.buffer = ""
        self.thought = False  # some thinking has been passed on

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        thinking = content = ""
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.opening):
                    self.buffer, self.state = stripped[len(self.opening):], "thinking"
                    continue
                if self.opening.startswith(stripped):  # perhaps the tag, not yet whole (or only whitespace)
                    return thinking, content
                self.state = "content"
            elif self.state == "thinking":
                if not self.thought:
                    self.buffer = self.buffer.lstrip()
                end = self.buffer.find(self.closing)
                if end >= 0:
                    piece, self.buffer, self.state = self.buffer[:end], self.buffer[end + len(self.closing):], "after"
                else:  # hold back what may start the closing tag, and whitespace that may come before it
                    cut = len(self.buffer) - held_back(self.buffer, self.closing)
                    cut = len(self.buffer[:cut].rstrip())
                    piece, self.buffer = self.buffer[:cut], self.buffer[cut:]
                thinking += piece.rstrip() if end >= 0 else piece
                self.thought = self.thought or bool(piece)
                if end < 0:
                    return thinking, content
            elif self.state == "after":
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return thinking, content
                self.state = "content"
            else:
                content += self.buffer
                self.buffer = ""
                return thinking, content

    def flush(self) -> tuple[str, str]:
        """What is still held when generation ends: an unfinished tag is text after all."""
        held, self.buffer = self.buffer, ""
        if self.state == "thinking":
            return held.rstrip(), ""
        return "", held.strip() if self.state == "start" else held


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag`` (held until the next piece shows whether they
    do): the thinking tags here, tool-call markers in corral/toolcalls.py."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
