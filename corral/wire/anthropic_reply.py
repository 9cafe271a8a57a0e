"""Anthropic's Messages replies: the ``Message`` object, its stream of events, its errors.

:class:`Reply` folds native chat chunks (api/inference.py) into one ``Message``, as the stream's events or as
the whole object, for ``POST /v1/messages``; :func:`from_native_final` renders a Message Batch request's stored
result the same way.  The requests these answer are read by :mod:`corral.wire.anthropic`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from corral.errors import CorralError
from corral.toolchoice import Constrained

# -- replies ---------------------------------------------------------------------------------------------------


def message_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


def stop_reason(done_reason: str | None, calls: bool, stop_sequence: str | None) -> str:
    if calls:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if done_reason == "length" else "end_turn"


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    """An Ollama tool call as a ``tool_use`` block, its id the call's own made Anthropic-looking (so a batch
    result reads the same each time)."""
    function = call["function"]
    own = str(call.get("id") or "").removeprefix("call_")
    return {"type": "tool_use", "id": f"toolu_{own}" if own else tool_use_id(), "name": function["name"],
            "input": function.get("arguments") or {}}


def message_object(
    model: str, text: str, thinking: str, calls: list[dict[str, Any]], done_reason: str | None,
    stop_sequence: str | None, input_tokens: int, output_tokens: int, *, ident: str | None = None,
) -> dict[str, Any]:
    """The non-streamed ``Message``: blocks in Ollama's order (thinking, text, tool_use), ``text`` and
    ``signature`` always present."""
    content: list[dict[str, Any]] = []
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if text or not calls:
        content.append({"type": "text", "text": text})
    content.extend(tool_use_block(c) for c in calls)
    return {
        "id": ident or message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason(done_reason, bool(calls), stop_sequence), "stop_sequence": stop_sequence,
        "usage": usage(input_tokens, output_tokens),
    }


def from_native_final(model: str, final: dict[str, Any], forced: list[str] | None = None,
                      ident: str | None = None) -> dict[str, Any]:
    """A stored native chat result (a batch item's output) as a ``Message``; ``forced``: the tools of which
    ``tool_choice`` forced a call (a call left as text becomes the call, corral/toolchoice.py)."""
    message = final.get("message") or {}
    content, calls = message.get("content", ""), list(message.get("tool_calls") or [])
    if forced:
        content, calls = Constrained(None, None, frozenset(forced)).reply(content, calls)
    return message_object(model, content, message.get("thinking") or "", calls, final.get("done_reason"), None,
                          int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0)), ident=ident)


class StopScanner:
    """Matches ``stop_sequences`` in the reply's text as it streams: what is safe to pass on, and the sequence
    that ended the reply (a text that may still become one is held back)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if self.hit is not None or not self.stops:
            return "" if self.hit is not None else text
        self.pending += text
        found = [(at, s) for s in self.stops if (at := self.pending.find(s)) >= 0]
        if found:
            at, self.hit = min(found)
            out, self.pending = self.pending[:at], ""
            return out
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# -- errors ----------------------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for a status (its table; other 4xx are ``invalid_request_error``)."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def error_body(message: str, status: int) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message},
            "request_id": f"req_{secrets.token_hex(12)}"}


def error_of(exc: BaseException) -> dict[str, Any]:
    """A mid-stream error event's data (or a batch request's ``errored`` error)."""
    if isinstance(exc, CorralError):
        return error_body(exc.message, exc.status_code)
    return error_body(f"internal error: {type(exc).__name__}", 500)


def sse_event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event: the Anthropic SDK dispatches on the ``event:`` line, so it is always written."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"



# -- one reply, streamed or whole --------------------------------------------------------------------------------

Event = tuple[str, dict[str, Any]]


class Reply:
    """Native chat chunks -> one ``Message``: as the stream's events (:meth:`feed`, dense block indices, each
    block closed before the next opens, as the SDK's accumulator needs) and as the whole object
    (:meth:`message`).  Text goes through the :class:`StopScanner` (``on_stop`` stops the worker; what it
    still sends is dropped); under a forced ``tool_choice`` it is held to the end, where a call left as text
    becomes the call."""

    def __init__(self, model: str, stops: list[str], plan: Constrained, input_estimate: int = 0,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.model, self.plan, self.input_estimate = model, plan, input_estimate
        self.ident = message_id()
        self.scanner = StopScanner(stops)
        self.on_stop = on_stop
        self.open: str | None = None
        self.index = -1
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.held: list[str] = []
        self.final: dict[str, Any] = {}

    def start(self) -> Event:
        head: dict[str, Any] = {"id": self.ident, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage(self.input_estimate, 0)}
        return "message_start", {"type": "message_start", "message": head}

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if chunk.get("done"):
            return self._finish(chunk)
        if self.scanner.hit is not None:
            return []
        message = chunk.get("message") or {}
        events: list[Event] = []
        if message.get("thinking"):
            self.thinking.append(message["thinking"])
            events += self._delta("thinking", message["thinking"])
        if message.get("content"):
            if self.plan.forced:
                self.held.append(message["content"])
            else:
                safe = self.scanner.feed(message["content"])
                if self.scanner.hit is not None and self.on_stop is not None:
                    self.on_stop()
                events += self._text(safe)
        for call in message.get("tool_calls") or []:
            events += self._call(call)
        return events

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        self.text.append(text)
        return self._delta("text", text)

    def _delta(self, kind: str, text: str) -> list[Event]:
        events = self._open(kind, {"type": "text", "text": ""} if kind == "text"
                            else {"type": "thinking", "thinking": "", "signature": ""})
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        return [*events, ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})]

    def _call(self, call: dict[str, Any]) -> list[Event]:
        self.calls.append(call)
        block = tool_use_block(call)
        events = self._open("tool_use", {**block, "input": {}})
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}))
        return [*events, *self._close()]

    def _open(self, kind: str, block: dict[str, Any]) -> list[Event]:
        if self.open == kind:
            return []
        events = self._close()
        self.index += 1
        self.open = kind
        return [*events, ("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})]

    def _close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _finish(self, chunk: dict[str, Any]) -> list[Event]:
        self.final = chunk
        events: list[Event] = []
        if self.plan.forced:
            content, calls = self.plan.reply("".join(self.held), [])
            for call in calls:
                events += self._call(call)
            events += self._text(content)
        elif self.scanner.hit is None:
            events += self._text(self.scanner.flush())
        if self.index < 0:  # an empty reply still has its (empty) text block
            events += self._open("text", {"type": "text", "text": ""})
        events += self._close()
        delta = {"stop_reason": self.stop_reason(), "stop_sequence": self.scanner.hit}
        counts = {"input_tokens": int(chunk.get("prompt_eval_count", 0)),
                  "output_tokens": int(chunk.get("eval_count", 0))}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": counts}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def stop_reason(self) -> str:
        return stop_reason(self.final.get("done_reason"), bool(self.calls), self.scanner.hit)

    def message(self) -> dict[str, Any]:
        """The whole ``Message`` once the last chunk is fed."""
        return message_object(
            self.model, "".join(self.text), "".join(self.thinking), self.calls, self.final.get("done_reason"),
            self.scanner.hit, int(self.final.get("prompt_eval_count", 0)), int(self.final.get("eval_count", 0)),
            ident=self.ident)
