"""Where llama_cpp is used (with decode_loop.py, weights.py and rerank.py): load a GGUF, prepare prompts, generate,
embed, score pairs.

Generation runs in the model's :class:`~workers.decode_loop.DecodeLoop` (continuous batching: many sequences
per ``llama_decode``) rather than ``create_completion``, so that corral owns what Ollama's wire format needs:
exact prompt/eval token counts and nanosecond timings, stop strings held back until they can no longer match,
``done_reason`` ("stop" or "length"), and a cancellation check between tokens (a client that disconnects stops
its generation).  llama_cpp failures become :mod:`corral.errors` types here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from corral.errors import BadRequest, ContextLengthExceeded, GenerationFailed, RequestCanceled
from corral.gbnf import GrammarTooLarge, InvalidSchema, schema_grammar
from corral.options import SamplingOptions
from workers import compute, weights
from workers.decode_loop import DecodeLoop, GenerationResult, SequenceHandle, SequenceRequest, set_adapters
from workers.media import MediaPrompt, Projector

if TYPE_CHECKING:
    from workers.rerank import PairFormat

log = logging.getLogger(__name__)

# With context shift on and no num_predict, a generation ends at its end-of-generation token; a model that never
# says it stops after this many contexts' worth of tokens (Ollama caps num_predict -1 at 10 x num_ctx likewise).
SHIFT_PREDICT_CAP = 10

@dataclass(frozen=True)
class LoadSpec:
    """Load-time parameters: two requests with the same spec share one loaded model."""

    path: Path
    embedding: bool
    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    pooling_mean: bool = False
    # rank pooling (a cross-encoder's classifier head: workers/rerank.py); never shares a context with the
    # same model's embedding load, whose pooling differs
    pooling_rank: bool = False
    parallel: int = 0  # decode slots (OLLAMA_NUM_PARALLEL); 0 = auto (see parallel_slots)
    weights: str = "native"  # "q8_0": decode from a Q8_0 copy of the file (workers/weights.py)
    adapters: tuple[Path, ...] = ()  # LoRA adapter GGUFs (a created model's ADAPTER layers), scale 1
    group_prefixes: bool = True  # CORRAL_PREFIX_GROUPING: batch prompts wait for a shared prefix to be prefilled
    projector: Path | None = None  # a vision model's projector GGUF (its projector layer): images (workers/media.py)


class LoadedModel:
    """A llama.cpp model with its decode loop (chat models) or its embedding context (embedding and rerank loads).

    Thread-safe: generations go through the decode loop, embedding decodes take ``_embed_lock``.
    """

    def __init__(self, spec: LoadSpec) -> None:
        import llama_cpp  # deferred: CUDA_VISIBLE_DEVICES must be set before this import

        self.spec = spec
        started = time.perf_counter()
        self.path = weights.prepare(spec.path, spec.weights, threads=spec.n_threads)
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": spec.n_ctx,
            "n_gpu_layers": spec.n_gpu_layers,
            "n_threads": spec.n_threads,
            "n_threads_batch": spec.n_threads,
            "embedding": spec.embedding,
            "verbose": False,
        }
        if spec.embedding:
            # Non-causal encoders need a whole input in one micro-batch; pack many inputs per decode.  Flash
            # attention keeps packed decodes cheap (measured on 2 CPU cores with all-minilm: 61 -> 119 chunks/s
            # at 512 tokens per decode; bench/embed_corpus.py).
            kwargs.update(n_batch=spec.n_ctx, n_ubatch=spec.n_ctx, flash_attn=True)
            if spec.pooling_rank:  # a GGUF converted from a cross-encoder seldom says so (no pooling_type key)
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_RANK
                # No flash attention: its CPU kernel takes another path (f16 Q and accumulator) for micro-batches
                # under 64 tokens than for longer ones, so a pair's score moved by up to 5e-3 with the lengths of
                # the pairs packed beside it, and a job line scored otherwise than the same request on the sync
                # route.  Without it a score is the same in any packing (to ~1e-6); measured cost on one CPU
                # thread, 100-token pairs on a 6-layer 384-wide BERT, one per decode: 17.4 -> 16.4 pairs/s.
                kwargs["flash_attn"] = False
            elif spec.pooling_mean:
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        else:
            # This context only serves the tokenizer; the decode loop makes the real one with one KV stream per
            # slot.
            kwargs.update(n_ctx=64, n_batch=64)
        try:
            self.llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise GenerationFailed(f"failed to load model: {exc}") from exc
        self._embed_lock = threading.Lock()
        self.loop: DecodeLoop | None = None
        self.projector: Projector | None = None
        try:
            adapters = self._load_adapters(llama_cpp, spec.adapters)
            if spec.embedding and adapters:
                set_adapters(llama_cpp, self.llm._ctx.ctx, adapters)
            if not spec.embedding:
                slots = parallel_slots(spec.parallel, kv_bytes_per_token(llama_cpp, self.llm.model), spec.n_ctx)
                self.loop = DecodeLoop(
                    self.llm, slots=slots, n_ctx_per_slot=spec.n_ctx, n_batch=min(512, spec.n_ctx * slots),
                    n_threads=spec.n_threads, adapters=adapters, group_prefixes=spec.group_prefixes,
                )
                if spec.projector is not None:
                    self.projector = Projector(spec.projector, self.llm.model, n_threads=spec.n_threads,
                                               use_gpu=spec.n_gpu_layers != 0)
        except GenerationFailed:
            if self.loop is not None:
                self.loop.close()
            self.llm.close()
            raise
        self.load_duration = int((time.perf_counter() - started) * 1e9)
        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._formatter = self._make_formatter()
        self.pair_format: PairFormat | None = None  # how this model lays out (query, document) pairs
        if spec.pooling_rank:
            from workers.rerank import PairFormat

            self.pair_format = PairFormat.of(llama_cpp, self.llm.model)

    def _load_adapters(self, llama_cpp: Any, paths: tuple[Path, ...]) -> list[Any]:
        """The model's LoRA adapters, loaded onto its weights (llama.cpp frees them with the model)."""
        adapters = []
        for path in paths:
            adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not adapter:
                raise GenerationFailed(f"failed to load the LoRA adapter {path.name}")
            adapters.append(adapter)
        return adapters

    def _make_formatter(self) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
            add_generation_prompt=True,
        )

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()  # ends every sequence, and with them their images' chunks
        if self.projector is not None:
            self.projector.close()
        self.llm.close()

    @property
    def n_ctx(self) -> int:
        """Context per sequence (``num_ctx``)."""
        return self.spec.n_ctx if self.loop is not None else int(self.llm.n_ctx())

    # -- prompts ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def count_tokens(self, text: str) -> int:
        """A message's own tokens, as a chat that is fitted into ``n_ctx`` counts them (workers/fitting.py)."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> tuple[list[int], list[str]]:
        """Render messages with the model's own chat template; return (tokens, template stop strings)."""
        tokens, stops, _ = self.chat_render(messages, tools)
        return tokens, stops

    def chat_render(
        self, messages: list[dict[str, Any]], tools: list[Any] | None = None, *, think: bool | str | None = None
    ) -> tuple[list[int], list[str], str]:
        """(tokens, stop strings, prompt text) of messages in the model's own chat template.  ``think`` reaches
        the template as ``enable_thinking`` (Qwen3, SmolLM3) and a level as ``reasoning_effort`` (gpt-oss)."""
        text, stops, add_bos = self._render(messages, tools, think)
        return self.tokenize(text, add_bos=add_bos), stops, text

    def chat_media(
        self, messages: list[dict[str, Any]], images: list[bytes], tools: list[Any] | None = None, *,
        think: bool | str | None = None,
    ) -> tuple[list[int], list[str], str, MediaPrompt]:
        """:meth:`chat_render` for messages whose ``[img-N]`` tags stand for ``images``, with the prompt's images
        (workers/media.py)."""
        text, stops, add_bos = self._render(messages, tools, think)
        media = self.media_prompt(text, images, add_special=add_bos)
        return media.tokens, stops, text, media

    def media_prompt(self, text: str, images: list[bytes], *, add_special: bool) -> MediaPrompt:
        if self.projector is None:
            raise BadRequest("this model does not support vision: the request has images")
        return self.projector.prompt(text, images, add_special=add_special)

    def _render(
        self, messages: list[dict[str, Any]], tools: list[Any] | None, think: bool | str | None
    ) -> tuple[str, list[str], bool]:
        """(prompt text, stop strings, whether to add BOS) of messages in the model's own chat template."""
        if self._formatter is None:
            return "".join(f"{m.get('content', '')}\n" for m in messages), [], True
        extra: dict[str, Any] = {}
        if think is not None:
            extra["enable_thinking"] = bool(think)
            if isinstance(think, str):
                extra["reasoning_effort"] = think
        try:
            rendered = self._formatter(messages=messages, tools=tools or None, **extra)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise BadRequest(f"template error: {exc}") from exc
        return rendered.prompt, list(rendered.stop or []), not rendered.added_special

    def raw_prompt(self, prompt: str) -> list[int]:
        return self.tokenize(prompt, add_bos=True)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """Fill-in-the-middle with the GGUF's FIM tokens, as llama.cpp's server lays it out (prefix, suffix,
        middle): ``[BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID``; the model writes the middle."""
        llama_cpp = self._llama_cpp
        ids = [int(f(self._vocab)) for f in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf,
                                               llama_cpp.llama_vocab_fim_mid)]
        if min(ids) < 0:
            raise BadRequest("this model has no fill-in-the-middle tokens")
        pre, suf, mid = ids
        tokens = [pre, *self.tokenize(prefix, add_bos=False), suf, *self.tokenize(suffix, add_bos=False), mid]
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        return ([self.llm.token_bos()] if add_bos else []) + tokens

    # -- generation -------------------------------------------------------------------------------------

    def start(
        self,
        prompt: list[int],
        options: dict[str, Any],
        *,
        stops: list[str],
        fmt: str | dict[str, Any] | None,
        interactive: bool,
        stream: bool = True,
        logprobs: int = -1,
        truncate: bool = True,
        shift: bool = True,
        special: bool = False,
        media: MediaPrompt | None = None,
    ) -> SequenceHandle:
        """Queue a generation in the decode loop: until EOG, a stop string, ``num_predict`` or the context end.

        Errors in the request itself (a bad ``format``) raise here, before anything is queued.  ``stream=False``:
        the text comes in one piece at the end (batch items).
        """
        try:
            if self.loop is None:
                raise BadRequest("this model is loaded for embeddings only")
            opts = SamplingOptions.of(options)
            prompt = prompt or [self.llm.token_bos()]
            # a prompt with images is never cut (half an image is no image): it fits, or it is a 400
            if (not truncate or media is not None) and len(prompt) > self.n_ctx - 1:
                raise ContextLengthExceeded("the input length exceeds the context length")
            prompt = self._fit_prompt(prompt, opts.num_keep)
            num_predict = opts.num_predict
            if shift:  # the context shifts as it fills (decode_loop.py); only num_predict ends the generation
                limit = num_predict if num_predict >= 0 else SHIFT_PREDICT_CAP * self.n_ctx
            else:
                limit = self.n_ctx - len(prompt)
                if num_predict >= 0:
                    limit = min(limit, num_predict)
            request = SequenceRequest(
                prompt=prompt,
                limit=limit,
                sampling=opts,
                seed=opts.seed,
                grammar=self._grammar(fmt),
                stops=list(opts.stop) + stops,
                interactive=interactive,
                stream=stream,
                logprobs=logprobs,
                shift_keep=min(opts.num_keep, self.n_ctx // 2) if shift else -1,
                special=special,
                media=media,
            )
            return self.loop.submit(request)
        except BaseException:
            if media is not None:  # never queued: its images' chunks are freed here
                media.close()
            raise

    def generate(
        self,
        prompt: list[int],
        options: dict[str, Any],
        *,
        stops: list[str],
        fmt: str | dict[str, Any] | None,
        on_text: Callable[[str], bool],
        cancelled: Callable[[], bool],
        interactive: bool = True,
    ) -> GenerationResult:
        """Generate and block until done; ``on_text`` gets each piece of text and returns True when the
        client has gone, ``cancelled`` is asked while no text comes."""
        handle = self.start(prompt, options, stops=stops, fmt=fmt, interactive=interactive)
        return handle.stream(on_text, cancelled)

    def _fit_prompt(self, prompt: list[int], num_keep: int) -> list[int]:
        """Keep a prompt inside the context as llama.cpp does: the first ``num_keep`` tokens and the tail."""
        budget = self.n_ctx - 1
        if len(prompt) <= budget:
            return prompt
        keep = max(0, min(num_keep, budget // 2))
        tail = budget // 2 - keep if budget > 1 else 0
        log.info("prompt of %d tokens truncated to %d to fit num_ctx=%d", len(prompt), keep + tail, self.n_ctx)
        return prompt[:keep] + prompt[len(prompt) - tail :]

    def _grammar(self, fmt: str | dict[str, Any] | None) -> Any:
        if fmt is None or fmt == "":
            return None
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        if fmt == "json":
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        if not isinstance(fmt, dict):
            raise BadRequest(f"invalid format: {json.dumps(fmt)[:100]}")
        # The API's converter and budget (corral/gbnf), run again here: what llama.cpp parses is what was measured,
        # and a request that reached the worker some other way is refused here rather than crashing it.
        try:
            return LlamaGrammar.from_string(schema_grammar(fmt), verbose=False)
        except (GrammarTooLarge, InvalidSchema) as exc:
            raise BadRequest(f"invalid format: {str(exc)[:300]}") from exc

    # -- embeddings -------------------------------------------------------------------------------------

    def embed_tokens(self, inputs: list[str], *, truncate: bool) -> list[list[int]]:
        """Tokenize inputs for embedding; longer than the context: cut (keeping the final [SEP]/EOS) or refuse."""
        limit = self.n_ctx
        eos = self.llm.token_eos()
        out = []
        for text in inputs:
            tokens = list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if len(tokens) > limit:
                if not truncate:
                    raise ContextLengthExceeded("the input length exceeds the context length")
                tokens = tokens[: limit - 1] + tokens[-1:] if tokens[-1] == eos else tokens[:limit]
            out.append(tokens)
        return out

    def embed_array(self, token_lists: list[list[int]]) -> np.ndarray:
        """Pooled, unnormalised float32 vectors, one row per input, packing many inputs into each decode."""
        return self.pooled(token_lists, width=int(self.llm.n_embd()))

    def pooled(self, token_lists: list[list[int]], *, width: int, pack_tokens: int = 0,
               cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """The pooled output of each input, ``width`` floats (``n_embd`` for an embedding, ``n_cls_out`` for a
        rank head), one row per input, packing many inputs into each decode.

        Inputs are sorted by length and packed up to ``pack_tokens`` (default :data:`PACK_TOKENS`, at most
        ``n_batch``) tokens and ``n_seq_max`` sequences per ``llama_decode`` (each its own sequence id, so pooling
        keeps them apart); rows come back in input order.  ``cancelled`` (the client has gone) is asked before
        each decode after the first: True ends the work with :class:`~corral.errors.RequestCanceled`.
        """
        llama_cpp = self._llama_cpp
        llm = self.llm
        # Packing past ~256 tokens per decode costs more in attention than it saves on CPUs
        # (bench/embed_corpus.py); an input longer than that still gets a decode of its own.
        n_batch, n_embd = min(int(llm.n_batch), pack_tokens or PACK_TOKENS), width
        n_seq_max = max(1, int(llm.context_params.n_seq_max))
        out = np.empty((len(token_lists), n_embd), dtype=np.float32)
        batch, ctx = llm._batch, llm._ctx
        members: list[int] = []
        used_decodes: list[int] = []
        used = 0

        def flush() -> None:
            if cancelled is not None and used_decodes and cancelled():
                raise RequestCanceled("the client went away before its inputs were all decoded")
            used_decodes.append(len(members))
            ctx.kv_cache_clear()
            compute.run(ctx.decode, batch)  # always the same thread (workers/compute.py)
            for seq, index in enumerate(members):
                pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                if not pointer:
                    raise GenerationFailed("embedding failed: the model returned no pooled output")
                out[index] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
            batch.reset()
            members.clear()

        self._embed_lock.acquire()
        batch.reset()
        try:
            for index in sorted(range(len(token_lists)), key=lambda i: len(token_lists[i])):
                tokens = token_lists[index]
                if members and (used + len(tokens) > n_batch or len(members) >= n_seq_max):
                    flush()
                    used = 0
                batch.add_sequence(tokens, len(members), True)
                members.append(index)
                used += len(tokens)
            if members:
                flush()
        except RuntimeError as exc:
            raise GenerationFailed(f"embedding failed: {exc}") from exc
        finally:
            batch.reset()
            ctx.kv_cache_clear()
            self._embed_lock.release()
        return out

    def embed(
        self, inputs: list[str], *, truncate: bool, normalize: bool, dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        """The sync endpoints' embeddings: lists of floats printed as Go prints float32; (vectors, tokens)."""
        tokens = self.embed_tokens(inputs, truncate=truncate)
        vectors = finish_vectors(self.embed_array(tokens), normalize=normalize, dimensions=dimensions)
        # float32 precision, printed as Go prints a float32 (9 significant digits at most)
        return [[float(f"{x:.9g}") for x in row] for row in vectors.tolist()], sum(len(t) for t in tokens)


PACK_TOKENS = 256


def finish_vectors(vectors: np.ndarray, *, normalize: bool, dimensions: int | None) -> np.ndarray:
    """Cut to ``dimensions`` and L2-normalise (Ollama re-normalises after cutting); refuse NaN/Inf."""
    if dimensions:
        vectors = vectors[:, :dimensions]
    if not np.isfinite(vectors).all():
        raise BadRequest("embedding contains NaN or Inf values")
    if normalize or dimensions:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
    return vectors.astype(np.float32, copy=False)


AUTO_SLOTS = 8
AUTO_KV_BUDGET = 2 << 30  # bytes of KV cache the automatic slot count may take


def kv_bytes_per_token(llama_cpp: Any, model: Any) -> int:
    """f16 K and V bytes one token takes in the cache, from the model's shape."""
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model)) or n_head
    n_embd_kv = int(llama_cpp.llama_model_n_embd(model)) * n_head_kv // n_head
    return int(llama_cpp.llama_model_n_layer(model)) * 2 * n_embd_kv * 2


def parallel_slots(configured: int, kv_per_token: int, n_ctx: int) -> int:
    """OLLAMA_NUM_PARALLEL when set; else up to 8 slots, fewer when their KV cache would pass 2 GiB."""
    if configured > 0:
        return configured
    per_slot = max(1, kv_per_token * n_ctx)
    return max(1, min(AUTO_SLOTS, AUTO_KV_BUDGET // per_slot))


def default_threads(configured: int) -> int:
    return configured or os.cpu_count() or 1

