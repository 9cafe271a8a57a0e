"""Run interactive requests through the gateway and shape the replies as Ollama does.

Views call these functions; they resolve the model (with each route's own not-found message), build the
:class:`InferenceRequest`, and turn worker events into Ollama chunks with nanosecond metrics.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal

from api.auth import principal, require_admin
from api.gateway import Gateway
from api.governance import Governor
from api.metrics import observe_first_token, observe_tokens
from corral.errors import BadRequest, GenerationFailed, IncompleteModel, ModelNotFound
from corral.modelstore.store import ModelName, ModelRecord, ModelStore
from corral.protocol import InferenceRequest, StreamEvent
from corral.requests import build_request
from corral.settings import Settings
from corral.wire.ollama import is_zero_keep_alive, ollama_chunk, ollama_final

# Ollama's embed routes word a missing model differently from generate/chat; clients match on it.
EMBED_NOT_FOUND = 'model "{name}" not found, try pulling it first'


@dataclass
class Inference:
    """The interactive-request service the Ollama (and later OpenAI) views share."""

    settings: Settings
    store: ModelStore
    gateway: Gateway
    governor: Governor

    def model(self, name: str, *, not_found: str | None = None) -> ModelRecord:
        """Find a model; ``not_found`` (with ``{name}``) overrides the route's 404 message."""
        try:
            record = self.store.get(name)
        except ModelNotFound as exc:
            if not_found is None or isinstance(exc, IncompleteModel):
                raise
            raise ModelNotFound(not_found.format(name=name)) from exc
        self.governor.check_model(principal(), name)  # the key's allow-list
        return record

    def generation_model(
        self, name: str, needed: str, *, think: bool | str | None = None, tools: bool = False, images: bool = False
    ) -> ModelRecord:
        """Find a model for generate/chat and check it can do what the request asks (Ollama's messages).  Images
        go to a model with a projector (``vision``), and are refused, never dropped, for any other."""
        return self.check_generation(self.model(name), name, needed, think=think, tools=tools, images=images)

    @staticmethod
    def check_generation(
        record: ModelRecord, name: str, needed: str, *, think: bool | str | None = None, tools: bool = False,
        images: bool = False,
    ) -> ModelRecord:
        """:meth:`generation_model`'s checks on a model already in hand (a route that learns what the request
        needs only after it has the model, as the Messages route does)."""
        if "completion" not in record.capabilities:
            raise BadRequest(f'"{name}" does not support {needed}')
        if images and "vision" not in record.capabilities:
            raise BadRequest(f"{ModelName.parse(name).display} does not support vision: the request has images")
        if think not in (None, False) and "thinking" not in record.capabilities:
            raise BadRequest(f'"{name}" does not support thinking')
        if tools and "tools" not in record.capabilities:
            raise BadRequest(f"{ModelName.parse(name).display} does not support tools")
        return record

    def request(self, record: ModelRecord, name: str, kind: str, **fields: Any) -> InferenceRequest:
        if is_zero_keep_alive(fields.get("keep_alive")):
            require_admin("unloading a model (keep_alive: 0)")
        return build_request(record, name, kind, max_predict=self.settings.max_predict, **fields)

    def count_chat(self, record: ModelRecord, name: str, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None, think: bool | str | None) -> int | None:
        """The prompt tokens of a chat as the model's own template and tokenizer render it, counted by a worker (a
        dry run's count op) under the key's admission; None when it does not render."""
        body: dict[str, Any] = {"messages": messages, "tools": tools, "think": think, "options": {}}
        ticket = self.governor.admit(principal(), name)
        try:
            counts = self.gateway.count_tokens(name, record.model_digest, "chat", [body], {})
            self.governor.finish(ticket)
        finally:
            self.governor.release(ticket)
        return counts[0] if counts else None

    def load_or_unload(
        self, record: ModelRecord, name: str, keep_alive: float | None, options: dict[str, Any] | None
    ) -> Literal["load", "unload"]:
        """An empty prompt or input: load the model (``keep_alive`` as given), or unload it for ``keep_alive: 0``."""
        if is_zero_keep_alive(keep_alive):
            require_admin("unloading a model (keep_alive: 0)")
            self.gateway.order_unload(record.model_digest)
            return "unload"
        self.single(self.request(record, name, "load", options=options, keep_alive=keep_alive))
        return "load"

    def single(self, req: InferenceRequest) -> tuple[dict[str, Any], dict[str, int]]:
        """Run a request whose reply is one result event (embed, load); return (data, timing metrics)."""
        with closing(self._replies(req)) as replies:
            for event, clock in replies:
                if event.kind == "result":
                    return event.data, clock.metrics(int(event.data.get("load_duration", 0)))
        raise GenerationFailed("the worker ended the request without a result")

    def generation(self, req: InferenceRequest, shape: Literal["generate", "chat"]) -> Iterator[dict[str, Any]]:
        """Yield Ollama stream chunks for a generate or chat request (closing it tells the worker to stop)."""
        first = True
        with closing(self._replies(req)) as replies:
            for event, clock in replies:
                if event.kind == "delta":
                    if first:
                        observe_first_token(req.model, clock.elapsed() / 1e9)
                        first = False
                    yield ollama_chunk(req.model, shape, event.data.get("c", ""), done=False,
                                       thinking=event.data.get("t", ""), logprobs=event.data.get("l"))
                elif event.kind == "tools":
                    chunk = ollama_chunk(req.model, shape, "", done=False)
                    chunk["message"]["tool_calls"] = event.data["tool_calls"]
                    yield chunk
                elif event.kind == "done":
                    stats = {**event.data, **clock.metrics(int(event.data.get("load_duration", 0)))}
                    observe_tokens(req.model, int(stats.get("eval_count", 0)))
                    yield ollama_final(req.model, shape, stats)
                    return

    def _replies(self, req: InferenceRequest) -> Generator[tuple[StreamEvent, _Clock], None, None]:
        """The request's reply events after ``start`` (which only times the wait for a worker), each with the
        request's clock; a worker's error is raised.  Closing this closes the stream, which stops the worker."""
        clock = _Clock()
        ticket = self.governor.admit(principal(), req.model)  # the key's limits: a 429 before anything runs
        try:
            events = self.gateway.run(req)
            try:
                for event in events:
                    if event.kind == "start":
                        clock.waited = clock.elapsed()
                        continue
                    event.raise_if_error()
                    if event.kind in ("done", "result"):
                        self.governor.finish(
                            ticket, prompt=int(event.data.get("prompt_eval_count") or 0),
                            generated=int(event.data.get("eval_count") or 0),
                            embed_inputs=len(req.inputs or []) if req.kind == "embed" else 0)
                    yield event, clock
            finally:
                events.close()
        finally:
            self.governor.release(ticket)


@dataclass
class _Clock:
    """A request's timing, as Ollama reports it: ``total_duration`` from arrival, ``load_duration`` the wait for
    a worker plus the worker's own model load (nanoseconds)."""

    started: int = field(default_factory=time.perf_counter_ns)
    waited: int = 0

    def elapsed(self) -> int:
        return time.perf_counter_ns() - self.started

    def metrics(self, worker_load_ns: int) -> dict[str, int]:
        return {"total_duration": self.elapsed(), "load_duration": self.waited + worker_load_ns}


def collect(chunks: Iterator[dict[str, Any]], shape: Literal["generate", "chat"]) -> dict[str, Any]:
    """Fold a stream into the single non-stream object: text concatenated, final chunk's metrics."""
    parts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    for chunk in chunks:
        logprobs.extend(chunk.get("logprobs") or [])
        parts.append(chunk["message"]["content"] if shape == "chat" else chunk["response"])
        thoughts.append((chunk["message"] if shape == "chat" else chunk).get("thinking", ""))
        if shape == "chat":
            calls.extend(chunk["message"].get("tool_calls") or [])
        final = chunk
    if shape == "chat":
        final["message"] = {"role": "assistant", "content": "".join(parts)}
        if any(thoughts):
            final["message"]["thinking"] = "".join(thoughts)
        if calls:
            final["message"]["tool_calls"] = calls
    else:
        final["response"] = "".join(parts)
        if any(thoughts):
            final["thinking"] = "".join(thoughts)
    if logprobs:
        final["logprobs"] = logprobs
    return final


def load_reply(model: str, shape: Literal["generate", "chat"], reason: Literal["load", "unload"]) -> dict[str, Any]:
    """The single object for an empty prompt (load) or empty prompt + ``keep_alive: 0`` (unload)."""
    chunk = ollama_chunk(model, shape, "", done=True)
    chunk["done_reason"] = reason
    return chunk
