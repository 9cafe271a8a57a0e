"""Running one request on a worker: the model it names, how it loads, its prompt (fitted to the context), and
its reply, streamed or whole.

:class:`RequestRunner` is the request half of a worker process (workers/runtime.py holds the other half: the
process's lifecycle and heartbeat).  Interactive requests (workers/interactive.py), batch chunks (workers/batch.py) and
dry runs (workers/items.py) all run their requests through it, so a job item's prompt is the sync route's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis

from corral.errors import BadRequest, CorralError, ModelNotFound
from corral.modelstore.layers import render_template, template_of
from corral.modelstore.store import ModelRecord, ModelStore
from corral.options import LoadOptions
from corral.protocol import InferenceRequest, StreamWriter, unload_key
from corral.settings import Settings
from corral.thinking import ThinkingSplitter
from corral.toolcalls import ToolCallHold, tool_format, tool_names
from workers.decode_loop import GenerationResult, SequenceHandle
from workers.engine import LoadedModel, LoadSpec, default_threads
from workers.fitting import Render, Rendered, fit_messages
from workers.media import MediaPrompt, decode_images
from workers.registry import ModelRegistry
from workers.rerank import has_classifier_head, require_reranker, rerank
from workers.weights import amx_kernels, bf16_kernels, choose_weights

log = logging.getLogger(__name__)


class RequestRunner:
    """Runs requests on one worker process's models."""

    def __init__(self, settings: Settings, store: ModelStore, client: redis.Redis, registry: ModelRegistry,
                 gpu: int | None) -> None:
        self.settings = settings
        self.store = store
        self.redis = client
        self.registry = registry
        self.gpu = gpu
        self.pull_from: str | None = None  # the API this worker copies models from (corral worker --pull-from)


    def record_for(self, name: str, model_digest: str) -> ModelRecord:
        """The model a request names, as this worker's store has it.  A worker with ``--pull-from`` copies a model
        it lacks first: one created from a model it serves shares that model's queue, and may bring layers
        (an adapter) that the request needs."""
        try:
            record = self.store.get(name)
            if record.model_digest == model_digest:
                return record
        except (ModelNotFound, BadRequest):
            pass
        if self.pull_from:
            from corral.modelstore.remote import pull_from_server

            try:
                pull_from_server(self.store, self.pull_from, [name], api_key=self.settings.api_key)
                record = self.store.get(name)
                if record.model_digest == model_digest:
                    return record
            except CorralError as exc:
                log.warning("cannot copy %s from %s: %s", name, self.pull_from, exc)
        found = self.store.find_by_model_digest(model_digest)
        if found is None:
            raise ModelNotFound(f"model '{name}' not found")
        return found

    def load_spec(self, record: ModelRecord, options: dict[str, Any], *, embedding: bool, rank: bool = False) -> LoadSpec:
        """How ``record`` loads for a request with ``options``: for generation, for embeddings, or with ``rank``
        for reranking (refused here, with a 400, for a model without a classifier head: workers/rerank.py)."""
        if rank:
            require_reranker(self.store.blob_path(record.model_digest), record.name.display)
            embedding = True
        train_ctx = int(record.config.get("context_length") or 0)
        load = LoadOptions.of(options)
        n_ctx = load.num_ctx or self.settings.default_num_ctx
        if train_ctx:
            n_ctx = min(n_ctx, train_ctx)
        n_ctx = max(n_ctx, 4)
        n_gpu = load.num_gpu if self.gpu is not None else 0
        on_cpu = n_gpu == 0
        weights = choose_weights(
            self.settings.cpu_weights, str(record.config.get("file_type") or "unknown"), on_cpu=on_cpu,
            parallel=self.settings.num_parallel, embedding=embedding, rank=rank,
            bf16=on_cpu and embedding and bf16_kernels(), amx=on_cpu and embedding and amx_kernels(),
        )
        return LoadSpec(
            path=self.store.blob_path(record.model_digest),
            embedding=embedding,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu,
            # a request's num_thread (bounded at the API) never asks for more threads than this machine has cores
            n_threads=min(load.num_thread or default_threads(self.settings.worker_threads),
                          os.cpu_count() or 1),
            pooling_mean=embedding and not rank and not record.is_embedding,
            pooling_rank=rank,
            parallel=self.settings.num_parallel,
            weights=weights,
            adapters=record.adapter_paths,
            group_prefixes=self.settings.prefix_grouping,
            projector=record.projector_paths[0] if record.projector_paths and not embedding else None,
        )

    def is_reranker(self, record: ModelRecord) -> bool:
        """A cross-encoder (the ``rerank`` capability), or an encoder with a classifier head in a store written
        before corral knew rerankers."""
        return "rerank" in record.capabilities or (
            record.is_embedding and has_classifier_head(self.store.blob_path(record.model_digest)))

    def execute(self, req: InferenceRequest, writer: StreamWriter) -> None:
        """Run one interactive request, writing its events to ``writer``."""
        record = self.record_for(req.model, req.model_digest)
        # a reranker loads with rank pooling, also to be preloaded; its rank head is not an embedding
        reranker = req.kind == "rerank" or (req.kind in ("load", "embed") and self.is_reranker(record))
        if reranker and req.kind == "embed":
            raise BadRequest(f"model '{req.model}' is a reranker: it scores documents against a query "
                             "(/v1/rerank), it does not embed")
        embedding = req.kind == "embed" or (req.kind == "load" and record.is_embedding)
        spec = self.load_spec(record, req.options, embedding=embedding or reranker, rank=reranker)
        keep_alive = self.settings.keep_alive if req.keep_alive is None else req.keep_alive
        order = self.redis.get(unload_key(record.model_digest))
        if order is not None:  # unloaded with keep_alive 0 since it loaded: this request loads it afresh
            self.registry.sweep(time.time(), {record.model_digest: float(order)})
        with self.registry.use(spec, record, req.model, keep_alive) as (model, load_ns):
            if req.kind == "load":
                final = ("result", {"done_reason": "load", "load_duration": load_ns})
            elif req.kind == "embed":
                final = ("result", {**self._embed(model, req), "load_duration": load_ns})
            elif req.kind == "rerank":
                scores, count = rerank(model, req.query or "", req.documents or [], truncate=req.truncate,
                                       cancelled=writer.cancelled)
                final = ("result", {"scores": scores, "prompt_eval_count": count, "load_duration": load_ns})
            else:
                final = ("done", {**self._generate(model, req, writer, record), "load_duration": load_ns})
        # The last event goes out after the model is let go of (and /api/ps updated): a client that asks
        # /api/ps as soon as its reply ends sees the model's new expiry, or sees it gone after keep_alive 0.
        writer.emit(*final)

    def _embed(self, model: LoadedModel, req: InferenceRequest) -> dict[str, Any]:
        vectors, count = model.embed(
            req.inputs or [], truncate=req.truncate, normalize=req.normalize, dimensions=req.dimensions
        )
        return {"embeddings": vectors, "prompt_eval_count": count}

    def start_generation(
        self, model: LoadedModel, req: InferenceRequest, *, interactive: bool, stream: bool = True,
        record: ModelRecord | None = None, cancelled: Callable[[], bool] | None = None,
    ) -> tuple[SequenceHandle, ThinkingSplitter | None]:
        """Render the prompt and queue the request in the model's decode loop (raises on a bad request);
        ``stream=False`` hands the text over in one piece at the end.  With thinking on, also the splitter that
        routes the reply's thinking apart from its content.

        A chat prompt longer than ``num_ctx`` loses whole messages, oldest first, keeping the system prompt and
        the last message, as Ollama's server does (with ``record``'s TEMPLATE when it has one: rendered here only);
        ``truncate: false`` makes it a 400 instead.  ``cancelled`` (the client has gone) is asked while a long chat
        is fitted (workers/fitting.py)."""
        prompt, stops, text, media = self.prompt_for(model, req, record, cancelled)
        splitter = None
        if req.think and req.think_tags:
            opening, closing = req.think_tags[:2]
            splitter = ThinkingSplitter(opening, closing, inside=text.rstrip().endswith(opening))
        handle = model.start(prompt, req.options, stops=stops, fmt=req.format, interactive=interactive, stream=stream,
                             logprobs=req.top_logprobs if req.logprobs else -1, truncate=req.truncate, shift=req.shift,
                             special=bool(req.tools),  # tool-call markers are often special tokens
                             media=media)
        return handle, splitter

    def prompt_for(
        self, model: LoadedModel, req: InferenceRequest, record: ModelRecord | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Rendered:
        """The prompt's tokens, its stop strings, its text and its images (None without), as
        :meth:`start_generation` hands them to the decode loop (and a dry run counts them).  A request with
        images has their ``[img-N]`` tags in its text (the API put them there: corral/images.py); they become
        llama.cpp's media chunks here (workers/media.py)."""
        stops: list[str] = []
        budget = model.n_ctx
        images = decode_images(req.images) if req.images else None
        media: MediaPrompt | None = None

        def fit(render: Render) -> Rendered:
            return fit_messages(render, req.messages or [], budget, truncate=req.truncate, cancelled=cancelled,
                                count=model.count_tokens)

        def raw(text: str) -> Rendered:
            if images is None:
                return model.raw_prompt(text), [], text, None
            prompt = model.media_prompt(text, images, add_special=True)
            return prompt.tokens, [], text, prompt

        if record is not None and template_of(record) is not None and req.kind in ("generate", "chat") and not req.raw:
            return self._templated(model, req, record, fit, raw)
        if req.kind == "chat":
            def chat(messages: list[dict[str, Any]]) -> Rendered:
                if images is None:
                    return (*model.chat_render(messages, req.tools, think=req.think), None)
                return model.chat_media(messages, images, req.tools, think=req.think)

            return fit(chat)
        if req.suffix:  # fill in the middle (the API checked the model has FIM tokens: `insert`)
            return model.fim_prompt(req.prompt or "", req.suffix), [], "", None
        if req.raw:
            return raw(req.prompt or "")
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt or ""}
        ]
        if images is None:
            prompt, stops, text = model.chat_render(messages, think=req.think)
        else:
            prompt, stops, text, media = model.chat_media(messages, images, think=req.think)
        return with_context(req.context, (prompt, stops, text, media))

    @staticmethod
    def _templated(
        model: LoadedModel, req: InferenceRequest, record: ModelRecord, fit: Callable[[Render], Rendered],
        raw: Callable[[str], Rendered],
    ) -> Rendered:
        """The prompt of a model with a TEMPLATE layer, rendered with it here and only here (corral/requests.py):
        a chat through the fitting, so a long one is never rendered and tokenized whole."""
        if req.kind == "chat":
            def templated(messages: list[dict[str, Any]]) -> Rendered:
                _, fields = render_template(record, "chat", {"messages": messages, "tools": req.tools,
                                                             "think": req.think})
                return raw(fields["prompt"])

            return fit(templated)
        _, fields = render_template(record, "generate", {"system": req.system, "prompt": req.prompt,
                                                         "suffix": req.suffix, "think": req.think})
        if fields.get("suffix"):  # the template does not place the suffix: the GGUF's FIM tokens do
            return model.fim_prompt(fields["prompt"], fields["suffix"]), [], "", None
        return with_context(req.context, raw(fields["prompt"]))

    @staticmethod
    def generation_stats(req: InferenceRequest, result: GenerationResult, record: ModelRecord | None = None) -> dict[str, Any]:
        """The final chunk's stats for a finished generation (``context`` for a generate that is not raw, as
        Ollama returns it, whichever template rendered its prompt)."""
        stats: dict[str, Any] = {
            "done_reason": result.done_reason,
            "prompt_eval_count": result.prompt_eval_count,
            "prompt_eval_duration": result.prompt_eval_duration,
            "eval_count": result.eval_count,
            "eval_duration": result.eval_duration,
        }
        if req.kind == "generate" and not req.raw:
            stats["context"] = result.context
        return stats

    def _generate(
        self, model: LoadedModel, req: InferenceRequest, writer: StreamWriter, record: ModelRecord
    ) -> dict[str, Any]:
        """Stream a generation's text to ``writer``; return its final stats."""
        handle, splitter = self.start_generation(model, req, interactive=True, record=record, cancelled=writer.cancelled)

        pending: list[dict[str, Any]] = []  # log-probabilities of the tokens behind the next piece of text

        def delta(**data: Any) -> bool:
            if pending:
                data["l"] = list(pending)
                pending.clear()
            return writer.emit("delta", data)

        def content(text: str) -> bool:
            return delta(c=text)

        held = ToolCallHold(tool_names(req.tools), content, tool_family(model, record)) if req.tools else None
        emit_content = held.feed if held else content

        def feed(text: str) -> bool:
            if splitter is None:
                return emit_content(text)
            thinking, text = splitter.feed(text)
            stop = delta(t=thinking) if thinking else False
            return (emit_content(text) if text else False) or stop

        result = handle.stream(feed, writer.cancelled, pending.extend)
        if splitter is not None:
            thinking, text = splitter.flush()
            if thinking:
                delta(t=thinking)
            if text:
                emit_content(text)
        if held is not None:
            calls, text = held.finish()
            if calls:
                writer.emit("tools", {"tool_calls": calls})
            elif text:
                content(text)
        if pending:  # the tokens of text held back (a tool call, a thinking tag) still have their values
            delta()
        stats = self.generation_stats(req, result, record)
        if stats["done_reason"] == "cancelled":
            log.info("request %s cancelled by its client after %d tokens", req.request_id, stats["eval_count"])
        return stats


def tool_family(model: LoadedModel, record: ModelRecord) -> str:
    """The tool-call family of the template that renders the model's prompts (its TEMPLATE layer, or the GGUF's)."""
    template = record.extras.get("template")
    return tool_format(template[-1] if template else str(model.llm.metadata.get("tokenizer.chat_template") or ""))


def with_context(context: list[int] | None, rendered: Rendered) -> Rendered:
    """A generate's prompt with an earlier reply's ``context`` in front, as Ollama puts it (its images' spans
    moved along)."""
    prompt, stops, text, media = rendered
    if context and media is not None:
        media.prepend(context)
        prompt = media.tokens
    elif context:
        prompt = list(context) + prompt
    return prompt, stops, text, media
