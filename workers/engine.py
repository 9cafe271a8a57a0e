"""The one place that calls llama_cpp: load a GGUF, generate token by token, embed.

Generation drives ``Llama.generate`` directly rather than ``create_completion`` so that this module owns what
Ollama's wire format needs: exact prompt/eval token counts and nanosecond timings, stop strings held back until
they can no longer match, ``done_reason`` ("stop" or "length"), and a cancellation check between tokens (a
client that disconnects stops its generation).  llama_cpp failures become :mod:`corral.errors` types here and
nowhere else.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from corral.errors import BadRequest, ContextLengthExceeded, GenerationFailed

log = logging.getLogger(__name__)

# Ollama's defaults for sampling options (api/types.go DefaultOptions).
DEFAULT_SAMPLING: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "num_predict": -1,
    "num_keep": 4,
    "repeat_last_n": 64,
}


@dataclass
class GenerationResult:
    """What the final Ollama chunk reports about one generation."""

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    context: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LoadSpec:
    """Load-time parameters: two requests with the same spec share one loaded model."""

    path: Path
    embedding: bool
    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    pooling_mean: bool = False


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop is never half-emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            out, self.pending = self.pending[:hit], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LoadedModel:
    """A llama.cpp model + context.  Not thread-safe: the registry gives it to one request at a time."""

    def __init__(self, spec: LoadSpec) -> None:
        import llama_cpp  # deferred: CUDA_VISIBLE_DEVICES must be set before this import

        self.spec = spec
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "model_path": str(spec.path),
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
            if spec.pooling_mean:
                kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        else:
            kwargs.update(n_batch=min(512, spec.n_ctx))
        try:
            self.llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise GenerationFailed(f"failed to load model: {exc}") from exc
        self.load_duration = int((time.perf_counter() - started) * 1e9)
        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._formatter = self._make_formatter()

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
        self.llm.close()

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    # -- prompts ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[Any] | None = None) -> tuple[list[int], list[str]]:
        """Render messages with the model's own chat template; return (tokens, template stop strings)."""
        if self._formatter is None:
            text = "".join(f"{m.get('content', '')}\n" for m in messages)
            return self.tokenize(text, add_bos=True), []
        try:
            rendered = self._formatter(messages=messages, tools=tools or None)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise BadRequest(f"template error: {exc}") from exc
        return self.tokenize(rendered.prompt, add_bos=not rendered.added_special), list(rendered.stop or [])

    def raw_prompt(self, prompt: str) -> list[int]:
        return self.tokenize(prompt, add_bos=True)

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(self.llm.detokenize(tokens)).decode("utf-8", errors="replace")

    # -- generation -------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: list[int],
        options: dict[str, Any],
        *,
        stops: list[str],
        fmt: str | dict[str, Any] | None,
        on_text: Callable[[str], bool],
        cancelled: Callable[[], bool],
    ) -> GenerationResult:
        """Sample until EOG, a stop string, ``num_predict`` or the context end.

        ``on_text`` receives each piece of text and returns True when the client has gone; ``cancelled`` is
        asked when no text was emitted for a while (held back by a stop-string prefix).
        """
        llama_cpp = self._llama_cpp
        opts = {**DEFAULT_SAMPLING, **{k: v for k, v in options.items() if v is not None}}
        n_ctx = self.n_ctx
        prompt = self._fit_prompt(prompt, int(opts["num_keep"]))
        seed = int(opts.get("seed", -1))
        self.llm.set_seed(seed if seed >= 0 else random.getrandbits(31))
        grammar = self._grammar(fmt)
        num_predict = int(opts["num_predict"])
        limit = n_ctx - len(prompt)
        if num_predict >= 0:
            limit = min(limit, num_predict)
        matcher = StopMatcher(list(opts.get("stop") or []) + stops)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[int] = []
        done_reason = "length"
        started = time.perf_counter_ns()
        first_token_at = started
        quiet = 0
        if limit <= 0:
            return GenerationResult("length", len(prompt), 0, 0, 0, prompt)
        # Evaluate the whole prompt every time.  Reusing a cached prefix changes the batch shape of the
        # prompt's last step, which changes logits in the last bits and so greedy outputs: temperature 0
        # must give the same text for the same request.
        self.llm.reset()
        try:
            tokens = self.llm.generate(
                prompt,
                top_k=int(opts["top_k"]),
                top_p=float(opts["top_p"]),
                min_p=float(opts["min_p"]),
                typical_p=float(opts["typical_p"]),
                temp=float(opts["temperature"]),
                repeat_penalty=float(opts["repeat_penalty"]),
                frequency_penalty=float(opts["frequency_penalty"]),
                presence_penalty=float(opts["presence_penalty"]),
                grammar=grammar,
                reset=True,
            )
            for token in tokens:
                if not generated:
                    first_token_at = time.perf_counter_ns()
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    done_reason = "stop"
                    break
                previous = generated[-8:] if generated else prompt[-8:]
                generated.append(token)
                piece = bytes(self.llm.detokenize([token], prev_tokens=previous))
                text, hit = matcher.feed(decoder.decode(piece))
                gone = on_text(text) if text else False
                if not text:
                    quiet += 1
                    if quiet % 4 == 0:
                        gone = cancelled()
                if gone:
                    done_reason = "cancelled"
                    break
                if hit:
                    done_reason = "stop_string"
                    break
                if len(generated) >= limit:
                    break
            else:
                done_reason = "stop"
        except (RuntimeError, ValueError) as exc:
            raise GenerationFailed(f"generation failed: {exc}") from exc
        if done_reason not in ("cancelled", "stop_string"):
            tail = matcher.flush() + decoder.decode(b"", final=True)
            if tail:
                on_text(tail)
        done_reason = "stop" if done_reason == "stop_string" else done_reason
        ended = time.perf_counter_ns()
        return GenerationResult(
            done_reason=done_reason,
            prompt_eval_count=len(prompt),
            prompt_eval_duration=max(first_token_at - started, 1),
            eval_count=len(generated),
            eval_duration=max(ended - first_token_at, 1),
            context=prompt + generated,
        )

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

        try:
            if fmt == "json":
                return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
            return LlamaGrammar.from_json_schema(json.dumps(fmt), verbose=False)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise BadRequest(f"invalid format: {exc}") from exc

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
        """Pooled, unnormalised float32 vectors, one row per input, packing many inputs into each decode.

        Inputs are sorted by length and packed up to ``n_batch`` tokens and ``n_seq_max`` sequences per
        ``llama_decode`` (each its own sequence id, so pooling keeps them apart); rows come back in input order.
        """
        llama_cpp = self._llama_cpp
        llm = self.llm
        # Packing past ~256 tokens per decode costs more in attention than it saves (bench/embed_corpus.py);
        # an input longer than that still gets a decode of its own.
        n_batch, n_embd = min(int(llm.n_batch), PACK_TOKENS), int(llm.n_embd())
        n_seq_max = max(1, int(llm.context_params.n_seq_max))
        out = np.empty((len(token_lists), n_embd), dtype=np.float32)
        batch, ctx = llm._batch, llm._ctx
        members: list[int] = []
        used = 0

        def flush() -> None:
            ctx.kv_cache_clear()
            ctx.decode(batch)
            for seq, index in enumerate(members):
                pointer = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                if not pointer:
                    raise GenerationFailed("embedding failed: the model returned no pooled embedding")
                out[index] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
            batch.reset()
            members.clear()

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


def default_threads(configured: int) -> int:
    return configured or os.cpu_count() or 1
