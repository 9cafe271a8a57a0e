"""The reply side of OpenAI's Responses API: the Response object, its output items, and the stream's events.

A native chat reply (thinking, text, tool calls, done reason, token counts) becomes output items in the order the
model wrote them: a ``reasoning`` item (the thinking, as its summary, and as ``encrypted_content`` when the
client asks for it, plain text as Ollama's), a ``message`` with one ``output_text`` part, then one
``function_call`` per call.  Text before a tool call is kept (Ollama drops it).  A length stop is ``status:
"incomplete"`` with ``incomplete_details.reason: "max_output_tokens"`` (Ollama reports ``completed``).

:func:`stream_events` yields the documented events in order, each with its ``sequence_number`` from 0:
``response.created``, ``response.in_progress``, then per item ``output_item.added`` ... ``output_item.done`` (with
the part, text, summary and argument events between), then exactly one of ``response.completed``,
``response.incomplete`` or ``response.failed`` (a failure after the 200 is reported so, never dropped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from corral.errors import CorralError
from corral.toolcalls import openai_tool_calls
from corral.toolchoice import Constrained
from corral.wire.openai_responses import ResponsesRequest, new_id

log = logging.getLogger(__name__)
FAILURE_CODES = ("rate_limit_exceeded", "context_length_exceeded")  # the codes Codex acts on; others: server_error


@dataclass
class Draft:
    """One response being made: its id and creation time, and the request's settings it echoes."""

    req: ResponsesRequest
    ident: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, status: str, output: list[dict[str, Any]], *, usage: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None, incomplete: str | None = None) -> dict[str, Any]:
        req = self.req
        reasoning = req.reasoning or {}
        text = dict(req.text or {})
        text.setdefault("format", {"type": "text"})
        done = status in ("completed", "incomplete", "failed", "cancelled")
        return {
            "id": self.ident, "object": "response", "created_at": self.created_at, "status": status,
            "background": req.background, "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": req.model,
            "output": output, "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature, "text": text,
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": [_echo_tool(t) for t in req.tools or []], "top_logprobs": req.top_logprobs or 0,
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": req.truncation or "disabled",
            "usage": usage if done else None, "metadata": req.metadata or {}, "user": None,
            "service_tier": "default",
        }

    def final(self, final: dict[str, Any], content: str, calls: list[dict[str, Any]], thinking: str,
              logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The finished Response for a native reply: its items, usage, and ``completed`` or ``incomplete``."""
        incomplete = final.get("done_reason") == "length"
        items = []
        if thinking:
            items.append(self.reasoning_item(new_id("rs"), thinking))
        if content or not (calls or thinking):  # a reply that is all thinking (cut short) has no message
            items.append(message_item(new_id("msg"), content, logprobs, "incomplete" if incomplete else "completed"))
        items.extend(function_call_item(new_id("fc"), call) for call in openai_tool_calls(calls))
        return self.envelope("incomplete" if incomplete else "completed", items, usage=usage_of(final),
                             incomplete="max_output_tokens" if incomplete else None)

    def reasoning_item(self, ident: str, thinking: str) -> dict[str, Any]:
        item: dict[str, Any] = {"id": ident, "type": "reasoning", "summary": [{"type": "summary_text", "text": thinking}]}
        if "reasoning.encrypted_content" in (self.req.include or []):
            item["encrypted_content"] = thinking  # plain text, as Ollama's: handed back, it is the thinking
        return item


def _echo_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                "parameters": tool.get("parameters"), "strict": tool.get("strict")}
    return tool


def usage_of(final: dict[str, Any]) -> dict[str, Any]:
    prompt, generated = int(final.get("prompt_eval_count", 0)), int(final.get("eval_count", 0))
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + generated}


def output_logprobs(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Native token log-probabilities in the Responses shape (each with its alternatives)."""
    def one(entry: dict[str, Any]) -> dict[str, Any]:
        token = str(entry.get("token", ""))
        return {"token": token, "logprob": float(entry.get("logprob", 0.0)),
                "bytes": entry.get("bytes") or list(token.encode())}
    return [{**one(e), "top_logprobs": [one(t) for t in e.get("top_logprobs") or []]} for e in entries or []]


def message_item(ident: str, text: str, logprobs: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {"id": ident, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text, output_logprobs(logprobs))]}


def _text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def function_call_item(ident: str, call: dict[str, Any], *, arguments: str | None = None) -> dict[str, Any]:
    """An OpenAI ``tool_calls`` entry as a ``function_call`` item (``arguments`` overrides, for the added event)."""
    function = call["function"]
    return {"id": ident, "type": "function_call", "status": "completed" if arguments is None else "in_progress",
            "call_id": call["id"], "name": function["name"],
            "arguments": function["arguments"] if arguments is None else arguments}


class _Events:
    """Numbers events from 0, in the order they are made."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event


def failure(exc: Exception) -> dict[str, Any]:
    """A Response ``error`` for a failure after the stream began (the message, never a traceback)."""
    if isinstance(exc, CorralError):
        code = exc.code if exc.code in FAILURE_CODES else "server_error"
        return {"code": code, "message": exc.message}
    return {"code": "server_error", "message": f"internal error: {type(exc).__name__}"}


def stream_events(draft: Draft, chunks: Iterator[dict[str, Any] | None], plan: Constrained,
                  finish: Callable[[dict[str, Any]], None]) -> Iterator[dict[str, Any]]:
    """Native chat chunks -> the Responses stream; ``finish`` gets the terminal Response (to store it) just
    before its event is sent.  A ``None`` among the chunks (the worker silent for a while) is sent on as
    ``response.in_progress`` again: an SSE comment is no event, and would not reset Codex's idle watchdog."""
    return _Stream(draft, plan, finish).run(chunks)


class _Stream:
    """One stream's state: the items so far, the open one (``reasoning`` or ``message``), what it has written."""

    def __init__(self, draft: Draft, plan: Constrained, finish: Callable[[dict[str, Any]], None]) -> None:
        self.draft, self.plan, self.finish = draft, plan, finish
        self.ev = _Events()
        self.items: list[dict[str, Any]] = []
        self.open: str | None = None
        self.thinking: list[str] = []
        self.texts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []

    def run(self, chunks: Iterator[dict[str, Any] | None]) -> Iterator[dict[str, Any]]:
        ev, draft = self.ev, self.draft
        yield ev("response.created", response=draft.envelope("in_progress", []))
        yield ev("response.in_progress", response=draft.envelope("in_progress", []))
        try:
            for chunk in chunks:
                if chunk is None:  # the worker is silent (a long prompt's prefill): a keep-alive clients ignore
                    yield ev("response.in_progress", response=draft.envelope("in_progress", []))
                    continue
                message = chunk["message"]
                self.calls.extend(message.get("tool_calls") or [])
                if chunk["done"]:
                    yield from self.end(chunk)
                    return
                if message.get("thinking"):
                    yield from self.think(message["thinking"])
                if message.get("content"):
                    if self.plan.forced:  # the call's JSON: shown as a call at the end, or as text if it is none
                        self.texts.append(message["content"])
                        self.logprobs.extend(chunk.get("logprobs") or [])
                        continue
                    if self.open != "message":
                        yield from self.open_message()
                    yield self.text_delta(message["content"], chunk.get("logprobs") or [])
            raise CorralError("the reply ended before the model finished")
        except Exception as exc:
            if not isinstance(exc, CorralError):
                log.exception("responses stream failed")
            for item in self.items:
                if item["type"] == "message":
                    item["status"] = "incomplete"
            yield from self.close()  # what was sent stays in the response, whole
            failed = draft.envelope("failed", self.items, error=failure(exc))
            self.keep(failed)
            yield ev("response.failed", response=failed)
        finally:
            close_chunks = getattr(chunks, "close", None)
            if close_chunks is not None:
                close_chunks()

    def keep(self, response: dict[str, Any]) -> None:
        """Hand the terminal Response to ``finish`` (which stores it); a failure there is logged, and the client
        still gets its terminal event."""
        try:
            self.finish(response)
        except Exception:
            log.exception("could not keep response %s", response["id"])

    def think(self, text: str) -> Iterator[dict[str, Any]]:
        if self.open != "reasoning":
            yield from self.close()
            item = {"id": new_id("rs"), "type": "reasoning", "summary": []}
            self.items.append(item)
            self.open = "reasoning"
            yield self.ev("response.output_item.added", output_index=len(self.items) - 1, item=item)
            yield self.ev("response.reasoning_summary_part.added", item_id=item["id"],
                          output_index=len(self.items) - 1, summary_index=0, part={"type": "summary_text", "text": ""})
        self.thinking.append(text)
        yield self.ev("response.reasoning_summary_text.delta", item_id=self.items[-1]["id"],
                      output_index=len(self.items) - 1, summary_index=0, delta=text)

    def open_message(self, status: str = "completed") -> Iterator[dict[str, Any]]:
        yield from self.close()
        item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        self.items.append(item)
        self.open = "message"
        index = len(self.items) - 1
        yield self.ev("response.output_item.added", output_index=index, item=item)
        yield self.ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                      part=_text_part("", []))
        item["status"] = status  # what it closes with (the added event has shown it in progress)

    def text_delta(self, text: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.texts.append(text)
        self.logprobs.extend(entries)
        return self.ev("response.output_text.delta", item_id=self.items[-1]["id"], output_index=len(self.items) - 1,
                       content_index=0, delta=text, logprobs=output_logprobs(entries))

    def close(self) -> Iterator[dict[str, Any]]:
        """Close the open item: its done events, then ``output_item.done`` with the item whole."""
        index, ev = len(self.items) - 1, self.ev
        if self.open == "reasoning":
            text = "".join(self.thinking)
            ids = {"item_id": self.items[index]["id"], "output_index": index, "summary_index": 0}
            yield ev("response.reasoning_summary_text.done", **ids, text=text)
            yield ev("response.reasoning_summary_part.done", **ids, part={"type": "summary_text", "text": text})
            self.items[index] = self.draft.reasoning_item(self.items[index]["id"], text)
        elif self.open == "message":
            text, logprobs = "".join(self.texts), output_logprobs(self.logprobs)
            ids = {"item_id": self.items[index]["id"], "output_index": index, "content_index": 0}
            yield ev("response.output_text.done", **ids, text=text, logprobs=logprobs)
            yield ev("response.content_part.done", **ids, part=_text_part(text, logprobs))
            self.items[index] = message_item(self.items[index]["id"], text, self.logprobs, self.items[index]["status"])
        if self.open is not None:
            yield ev("response.output_item.done", output_index=index, item=self.items[index])
        self.open = None

    def end(self, final: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The open item closed, a held forced call resolved, the calls, then the terminal event."""
        incomplete = final.get("done_reason") == "length"
        status = "incomplete" if incomplete else "completed"
        has_message = any(item["type"] == "message" for item in self.items)
        for item in self.items:
            if item["type"] == "message":
                item["status"] = status
        yield from self.close()
        content, calls = self.plan.reply("".join(self.texts), self.calls) if self.plan.forced else ("", self.calls)
        if (content or not (calls or self.thinking)) and not has_message:  # a held text that is no call, or nothing
            entries = list(self.logprobs)
            self.texts.clear()
            self.logprobs.clear()
            yield from self.open_message(status)
            if content:
                yield self.text_delta(content, entries)
            yield from self.close()
        for call in openai_tool_calls(calls):
            index = len(self.items)
            added = function_call_item(new_id("fc"), call, arguments="")
            self.items.append(added)
            ids = {"item_id": added["id"], "output_index": index}
            arguments = call["function"]["arguments"]
            yield self.ev("response.output_item.added", output_index=index, item=added)
            yield self.ev("response.function_call_arguments.delta", **ids, delta=arguments)
            yield self.ev("response.function_call_arguments.done", **ids, name=call["function"]["name"],
                          arguments=arguments)
            self.items[index] = function_call_item(added["id"], call)
            yield self.ev("response.output_item.done", output_index=index, item=self.items[index])
        response = self.draft.envelope(status, self.items, usage=usage_of(final),
                                       incomplete="max_output_tokens" if incomplete else None)
        self.keep(response)
        yield self.ev(f"response.{status}", response=response)


def job_response(echo: dict[str, Any], final: dict[str, Any], ident: str, created: int) -> dict[str, Any]:
    """A job item's result (the native chat reply of a batch line or a background response) as the Response
    the sync route sends."""
    draft = Draft(ResponsesRequest.model_validate(echo), ident=ident, created_at=created)
    message = final.get("message") or {}
    return draft.final(final, message.get("content", ""), message.get("tool_calls") or [],
                       message.get("thinking", ""), final.get("logprobs") or [])
