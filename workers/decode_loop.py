"""Continuous batching: one decode loop per loaded chat model, many sequences per ``llama_decode``.

llama-cpp-python's high-level ``generate`` runs one sequence per context, which leaves most of the hardware
idle (on 2 CPU cores, 8 sequences decoded together make ~2.5x the tokens per second of one).  A
:class:`DecodeLoop` owns one llama.cpp context with ``n_seq_max`` = slots and a thread that, each step:

1. admits waiting sequences into free slots (interactive before batch, then first come first served);
2. builds one ``llama_batch``: the last sampled token of every generating sequence, then prompt tokens of
   sequences still in prefill, up to ``n_batch`` tokens in all (chunked prefill: a long prompt is fed over
   several steps, so the other streams keep producing tokens while it loads), in slot order, with a throwaway
   token in a short gap of idle slots: with one KV stream per slot, llama.cpp makes one pass over the weights
   per run of consecutive sequence ids (measured: 8-sequence steps of 40-52 ms in arrival order, 18 in slot
   order);
3. decodes once and samples each sequence with its own sampler chain (its temperature, top-k/p, penalties,
   seed and grammar), applies its stop strings and token limit, and frees the slot when it ends.

A slot keeps the KV cells of its last sequence (prompt and generated tokens) after it ends, and a new
sequence goes to the free slot whose cells share the longest prefix with its prompt, so only the rest of the
prompt is decoded, as Ollama's runner and llama.cpp's server reuse their slots' caches.  A chat's next turn
(the whole conversation sent again) then prefills only the new messages.  When another slot holds a longer
prefix (a system prompt shared by concurrent chats), the new sequence starts from a copy of that slot's
stream (llama.cpp copies whole streams: 6 ms for 4096 cells of SmolLM2 on 2 cores, the cost of prefilling 5
tokens).  ``prompt_eval_count`` still counts the whole prompt.  Like llama.cpp's server with its prompt
cache, this trades bit-exactness for time: a prompt prefilled in two pieces gets logits slightly different
from one prefilled in one piece (measured: up to 0.5 apart; batching with other sequences changes nothing),
so a greedy answer can part from a cold run's after some tokens.

The KV cache is not unified (each slot has its own stream of ``num_ctx`` cells) and flash attention is on: a
sequence's attention then reads exactly the cells it would read alone, in the same order, which keeps greedy
output identical whether a prompt runs alone or among 15 others (measured with a unified cache: 6 of 16
outputs changed; tests/integration/test_continuous_batching.py).

Callers never touch the context: :meth:`DecodeLoop.submit` returns a :class:`SequenceHandle` whose
:meth:`~SequenceHandle.stream` blocks the calling thread (a Celery task thread) and hands it the text as it is
produced, so Redis writes and SQL never slow the loop.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from corral.errors import BadRequest, CorralError, GenerationFailed
from corral.options import SamplingOptions
from workers import compute
from workers.media import MediaPrompt
from workers.sampling import StopMatcher, sampler_chain, token_logprobs
from workers.slots import COPY_CTX_PER_TOKEN, MIN_COPY_TOKENS, common_prefix, donor, gap_fillers, pick_slot, worth_copying

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often a quiet stream asks whether its client is still there


@dataclass
class GenerationResult:
    """What the final Ollama chunk reports about one generation."""

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    context: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one entry per generated token, when asked


@dataclass
class SequenceRequest:
    """One generation as the loop runs it: tokens in, limits, and how to sample."""

    prompt: list[int]
    limit: int
    sampling: SamplingOptions
    seed: int
    grammar: Any  # llama_cpp.llama_grammar.LlamaGrammar | None
    stops: list[str]
    interactive: bool
    # False: the text comes to the caller in one piece when the sequence ends.  A batch item needs no tokens
    # as they come, and each hand-over wakes a waiting thread that then competes with llama_decode's threads
    # for the cores (measured on 2 cores, 64 sequences: ~5% more tokens/s unstreamed; bench/README.md).
    stream: bool = True
    # -1: no log-probabilities; n >= 0: each generated token's, with the n most likely alternatives (0-20).
    logprobs: int = -1
    # Context shift: -1 off (the generation ends when the context is full); n >= 0: when it is full, keep the
    # first n tokens and discard half of the rest, as llama.cpp's and Ollama's runners do, and go on.
    shift_keep: int = -1
    # Render special tokens as text (a request with tools: <|python_tag|>, <|call|> and the like mark calls).
    special: bool = False
    # A prompt with images (workers/media.py): their positions in ``prompt`` hold placeholder ids, and the loop
    # encodes each image when the prefill reaches it.  The loop closes it when the sequence ends.
    media: MediaPrompt | None = None


class SequenceHandle:
    """The caller's side of one sequence: its text as it comes, its result, and a way to stop it."""

    def __init__(self, request: SequenceRequest, order: int) -> None:
        self.request = request
        self.order = order
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.cancel_requested = threading.Event()

    def cancel(self) -> None:
        self.cancel_requested.set()

    def stream(
        self, on_text: Callable[[str], bool], cancelled: Callable[[], bool],
        on_logprobs: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> GenerationResult:
        """Block until the sequence ends, passing each piece of text to ``on_text`` (and the log-probabilities of
        the tokens behind it to ``on_logprobs`` first, when the request asked for them).

        ``on_text`` returns True when the client has gone; ``cancelled`` is asked whenever no text came for
        :data:`POLL_SECONDS` (a stream held back by a stop-string prefix, or still waiting for a slot).
        """
        while True:
            try:
                kind, value = self.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.cancel_requested.is_set() and cancelled():
                    self.cancel()
                continue
            if kind == "logprobs":
                if on_logprobs is not None:
                    on_logprobs(value)
            elif kind == "text":
                if on_text(value) and not self.cancel_requested.is_set():
                    self.cancel()
            elif kind == "error":
                raise value
            else:
                result: GenerationResult = value
                return result


@dataclass
class _Active:
    """Loop-thread state of a sequence that holds a slot."""

    handle: SequenceHandle
    slot: int
    sampler: Any
    todo: list[int]  # prompt tokens not yet decoded, then the one sampled token to feed next
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # per generated token, when asked for
    logprobs_sent: int = 0  # how many of them went out with streamed text
    shifts: int = 0  # context shifts so far
    generated: list[int] = field(default_factory=list)
    started: int = 0
    first_token_at: int = 0
    matcher: StopMatcher = field(default_factory=lambda: StopMatcher([]))
    decoder: Any = None
    held: list[str] = field(default_factory=list)  # the text of a sequence that is not streamed


class DecodeLoop:
    """The single owner of one llama.cpp context; see the module docstring."""

    def __init__(
        self, llm: Any, *, slots: int, n_ctx_per_slot: int, n_batch: int, n_threads: int, adapters: list[Any] | None = None,
        group_prefixes: bool = True,
    ) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        self.llm = llm
        self.slots = slots
        self.n_ctx = n_ctx_per_slot
        self.n_batch = n_batch
        self.group_prefixes = group_prefixes
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_slot * slots
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = False
        # Flash attention keeps a sequence's attention sums in the same order whatever else is in the batch
        # (measured: without it, 5 of 16 greedy outputs changed when batched) and is faster on CPU.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        try:
            self._context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        except ValueError as exc:
            raise GenerationFailed(f"failed to create a context for {slots} slots: {exc}") from exc
        self._ctx = self._context.ctx
        if adapters:  # a created model's LoRA adapters, on this context only (the base model's own stay clean)
            try:
                set_adapters(llama_cpp, self._ctx, adapters)
            except GenerationFailed:
                self._context.close()
                raise
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._waiting: list[SequenceHandle] = []
        self._active: dict[int, _Active] = {}
        # Per slot, the tokens whose KV cells it holds (positions 0..n-1).
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        self._cond = threading.Condition()
        self._closed = False
        self._order = itertools.count()
        # Since load, for the heartbeat (one writer, the loop): tokens sampled, and prompt tokens actually decoded
        # (a prefix kept in a slot or copied from another is not counted: bench/prefix_batch.py reads this).
        self.generated_total = 0
        self.prompt_decoded_total = 0
        self.busy_seconds = 0.0  # time spent in steps: generated_total / busy_seconds is the loop's busy rate
        self._thread = threading.Thread(target=self._run, name="corral-decode-loop", daemon=True)
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------------------------

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        handle = SequenceHandle(request, next(self._order))
        with self._cond:
            if self._closed:
                raise GenerationFailed("model is being unloaded")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    @property
    def busy(self) -> int:
        """Slots holding a sequence now (read without the lock: a gauge for the heartbeat)."""
        return len(self._active)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._llama_cpp.llama_batch_free(self._batch)
        self._context.close()

    # -- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admit()
            for handle, slot in admitted:
                self._start(handle, slot)
            if self._active:
                began = time.perf_counter()
                try:
                    self._step()
                except Exception as exc:  # a failed decode fails the sequences in it, never the loop
                    log.exception("decode step failed")
                    error = exc if isinstance(exc, CorralError) else GenerationFailed(f"generation failed: {exc}")
                    for active in list(self._active.values()):
                        self._end(active, error=error)
                self.busy_seconds += time.perf_counter() - began
        with self._cond:
            waiting, self._waiting = self._waiting, []
        for active in list(self._active.values()):
            self._end(active, error=GenerationFailed("model unloaded while generating"))
        for handle in waiting:
            self._release(handle.request)
            handle.events.put(("error", GenerationFailed("model unloaded before the request ran")))

    def _admit(self) -> list[tuple[SequenceHandle, int]]:
        """Give free slots to waiting sequences: interactive first, then in arrival order (lock held).

        Each takes the free slot whose cached tokens share the longest prefix with its prompt; on a tie (no
        shared prefix, say) the lowest, which keeps the busy slots one consecutive run (see ``_step``).
        """
        free = [s for s in range(self.slots) if s not in self._active]
        if not free or not self._waiting:
            return []
        self._waiting.sort(key=lambda h: (not h.request.interactive, h.order))
        chosen: list[SequenceHandle] = []
        later: list[SequenceHandle] = []
        for handle in self._waiting:
            if len(chosen) == len(free) or (self.group_prefixes and self._follows(handle, chosen)):
                later.append(handle)
            else:
                chosen.append(handle)
        self._waiting = later
        admitted = []
        for handle in chosen:
            slot = pick_slot(free, self._cached, handle.request.prompt)
            free.remove(slot)
            admitted.append((handle, slot))
        return admitted

    def _follows(self, handle: SequenceHandle, chosen: list[SequenceHandle]) -> bool:
        """Whether a batch sequence should wait a step for a prefix it shares with a sequence that is about to
        prefill it (admitted in this round) or is prefilling it now: it then starts from a copy of that slot's
        cells (``_start``) instead of computing the same prefix again.  This is how a chunk of prompts that share
        a 400-token rubric pays for the rubric once (bench/prefix_batch.py).  Interactive requests never wait."""
        if handle.request.interactive:
            return False
        prompt = handle.request.prompt
        threshold = max(MIN_COPY_TOKENS, self.n_ctx // COPY_CTX_PER_TOKEN)
        held = max((common_prefix(cached, prompt) for cached in self._cached), default=0)  # copyable now
        for leader in chosen:
            shared = min(common_prefix(leader.request.prompt, prompt), len(prompt) - 1)
            if shared >= threshold and shared > held + threshold:
                return True
        for active in self._active.values():
            shared = min(common_prefix(active.handle.request.prompt, prompt), len(prompt) - 1)
            if shared >= threshold and len(self._cached[active.slot]) < shared and shared > held + threshold:
                return True
        return False

    def _start(self, handle: SequenceHandle, slot: int) -> None:
        req = handle.request
        now = time.perf_counter_ns()
        if handle.cancel_requested.is_set():
            self._release(req)
            handle.events.put(("done", GenerationResult("cancelled", len(req.prompt), 0, 0, 0, _context(req))))
            return
        if req.limit <= 0:
            self._release(req)
            handle.events.put(("done", GenerationResult("length", len(req.prompt), 0, 0, 0, _context(req))))
            return
        text = _text_tokens(req)
        bad = next((token for token in text if not 0 <= token < self._n_vocab), None)
        if bad is not None:  # llama_decode would fail the whole step, every other sequence in it included
            self._release(req)
            handle.events.put(("error", BadRequest(
                f"invalid context: token id {bad} is outside the model's vocabulary (0 to {self._n_vocab - 1})"
            )))
            return
        try:
            sampler = self._sampler(req)
        except Exception as exc:
            self._release(req)
            handle.events.put(("error", GenerationFailed(f"generation failed: {exc}")))
            return
        # Keep the cells of the shared prefix; at least the prompt's last token is decoded again, for its logits.
        limit = len(req.prompt) - 1
        keep = min(common_prefix(self._cached[slot], req.prompt), limit)
        source, shared = donor(slot, self._cached, req.prompt)
        if worth_copying(min(shared, limit) - keep, self.n_ctx):
            # Another slot holds a longer prefix (the same system prompt, say): copy its stream, which llama.cpp
            # does for whole streams only (at the next decode, before anything else is computed).
            self._llama_cpp.llama_memory_seq_cp(self._memory, source, slot, -1, -1)
            self._cached[slot] = list(self._cached[source])
            keep = min(shared, limit)
        cut = req.media.inside(keep) if req.media is not None else None
        if cut is not None:  # half an image's cells: the image is decoded again whole
            keep = cut.start
        if not self._llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1):
            keep = 0  # the cache cannot drop a tail (llama.cpp refuses for some memory types): start over
            self._llama_cpp.llama_memory_seq_rm(self._memory, slot, -1, -1)
        del self._cached[slot][keep:]
        self._active[slot] = _Active(
            handle=handle, slot=slot, sampler=sampler, todo=list(req.prompt[keep:]), started=now,
            matcher=StopMatcher(req.stops), decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
        )

    def _sampler(self, req: SequenceRequest) -> Any:
        return sampler_chain(self._llama_cpp, self._vocab, self._n_vocab, req.sampling, req.grammar, req.seed)

    def _step(self) -> None:
        """One ``llama_decode`` over every active sequence, then one sampled token for each that is ready."""
        llama_cpp = self._llama_cpp
        for active in [a for a in self._active.values() if a.handle.cancel_requested.is_set()]:
            self._end(active, reason="cancelled")
        if not self._active:
            return
        batch = self._batch
        batch.n_tokens = 0
        sampling: list[tuple[_Active, int]] = []

        def add(active: _Active, tokens: list[int], last: bool) -> None:
            cached = self._cached[active.slot]  # its KV cells: the next token goes at position len(cached)
            for k, token in enumerate(tokens):
                j = batch.n_tokens
                batch.token[j] = token
                batch.pos[j] = len(cached) + k
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = active.slot
                batch.logits[j] = last and k == len(tokens) - 1
                batch.n_tokens += 1
            cached.extend(tokens)
            if last:
                sampling.append((active, batch.n_tokens - 1))

        generating = [a for a in self._active.values() if a.first_token_at]
        prefilling = sorted(
            (a for a in self._active.values() if not a.first_token_at),
            key=lambda a: (not a.handle.request.interactive, a.handle.order),
        )
        parts: dict[int, tuple[_Active, list[int], bool]] = {}
        for active in generating:
            parts[active.slot] = (active, active.todo, True)
            active.todo = []
        budget = self.n_batch - len(generating)
        for active in prefilling:
            if budget <= 0:
                break
            media = active.handle.request.media
            if media is not None:
                if not self._images(active, media):
                    continue
                # this step's text stops where the next image starts (it is encoded at the next step)
                at = len(self._cached[active.slot])
                room = min(budget, media.next_start(at) - at)
            else:
                room = budget
            part, active.todo = active.todo[:room], active.todo[room:]
            if not part:
                continue
            parts[active.slot] = (active, part, not active.todo)
            budget -= len(part)
            self.prompt_decoded_total += len(part)
        fillers = gap_fillers(sorted(parts), budget, self._active)
        # In slot order: llama.cpp puts a run of consecutive sequence ids, in the order they first appear, into
        # one micro-batch (one pass over the weights); any other order or gap splits the step into several.
        for slot in sorted([*parts, *fillers]):
            if slot in parts:
                add(*parts[slot])
            else:
                j = batch.n_tokens
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = 0, len(self._cached[slot]), 1
                batch.seq_id[j][0], batch.logits[j] = slot, False
                batch.n_tokens += 1
        try:
            rc = compute.run(llama_cpp.llama_decode, self._ctx, batch)  # always the same thread (workers/compute.py)
        finally:
            for slot in fillers:  # the filler's cell goes; the slot's cached prefix stays
                llama_cpp.llama_memory_seq_rm(self._memory, slot, len(self._cached[slot]), -1)
        if rc != 0:
            raise GenerationFailed(f"generation failed: llama_decode returned {rc}")
        now = time.perf_counter_ns()
        for active, index in sampling:
            token = llama_cpp.llama_sampler_sample(active.sampler, self._ctx, index)
            wanted = active.handle.request.logprobs
            if wanted >= 0 and not llama_cpp.llama_vocab_is_eog(self._vocab, token):
                active.logprobs.append(self._logprob(index, token, wanted))
            if not active.first_token_at:
                active.first_token_at = now
            self._accept(active, token)

    def _images(self, active: _Active, media: MediaPrompt) -> bool:
        """Encode the images that the sequence's prefill has reached, into its cells (libmtmd decodes their
        embeddings itself: a step of its own, before this step's batch).  An image that fails ends its own
        sequence only (False)."""
        cached = self._cached[active.slot]
        while (span := media.span_at(len(cached))) is not None:
            try:
                media.evaluate(span, self._ctx, len(cached), active.slot, self.n_batch)
            except Exception as exc:
                log.exception("encoding an image failed")
                error = exc if isinstance(exc, CorralError) else GenerationFailed(f"encoding an image failed: {exc}")
                self._end(active, error=error)
                return False
            cached.extend(active.todo[:span.length])
            del active.todo[:span.length]
            self.prompt_decoded_total += span.length
        return True

    @staticmethod
    def _release(req: SequenceRequest) -> None:
        if req.media is not None:
            req.media.close()

    def _shift(self, active: _Active) -> bool:
        """Make room in a full context: keep the first ``shift_keep`` cells, discard half of the others (the
        oldest), move the rest down.  False when the request does not shift or the memory cannot."""
        keep = active.handle.request.shift_keep
        llama_cpp, slot = self._llama_cpp, active.slot
        if keep < 0 or not llama_cpp.llama_memory_can_shift(self._memory):
            return False
        cached = self._cached[slot]
        discard = max((len(cached) - keep) // 2, 1)
        llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, keep + discard)
        llama_cpp.llama_memory_seq_add(self._memory, slot, keep + discard, -1, -discard)
        del cached[keep:keep + discard]
        active.shifts += 1
        return True

    @staticmethod
    def _send_logprobs(active: _Active) -> None:
        if len(active.logprobs) > active.logprobs_sent:
            active.handle.events.put(("logprobs", active.logprobs[active.logprobs_sent:]))
            active.logprobs_sent = len(active.logprobs)

    def _logprob(self, index: int, token: int, top: int) -> dict[str, Any]:
        logits = self._llama_cpp.llama_get_logits_ith(self._ctx, index)
        return token_logprobs(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)), token, top, self.llm.detokenize)

    def _accept(self, active: _Active, token: int) -> None:
        """Apply one sampled token: end of generation, text and stop strings, the token limit."""
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._end(active, reason="stop")
            return
        previous = active.generated[-8:] if active.generated else _text_tokens(active.handle.request)[-8:]
        active.generated.append(token)
        self.generated_total += 1
        piece = bytes(self.llm.detokenize([token], prev_tokens=previous, special=active.handle.request.special))
        text, hit = active.matcher.feed(active.decoder.decode(piece))
        if text:
            if active.handle.request.stream:
                self._send_logprobs(active)
                active.handle.events.put(("text", text))
            else:
                active.held.append(text)
        if hit:
            self._end(active, reason="stop", flush=False)
        elif len(active.generated) >= active.handle.request.limit:
            self._end(active, reason="length")
        elif len(self._cached[active.slot]) + 1 >= self.n_ctx and not self._shift(active):
            self._end(active, reason="length")  # the context is full and may not shift
        else:
            active.todo = [token]

    def _end(self, active: _Active, *, reason: str = "", error: CorralError | None = None, flush: bool = True) -> None:
        """Free the slot (its sampler; its KV cells stay, for the next prompt that shares their prefix) and
        hand the caller its result."""
        llama_cpp = self._llama_cpp
        self._active.pop(active.slot, None)
        llama_cpp.llama_sampler_free(active.sampler)
        handle = active.handle
        self._release(handle.request)
        if active.shifts:  # shifted cells are not what a fresh prompt would compute: keep only the untouched head
            keep = handle.request.shift_keep
            llama_cpp.llama_memory_seq_rm(self._memory, active.slot, keep, -1)
            del self._cached[active.slot][keep:]
        if error is not None:
            # A failed decode may have left any of the batch's cells half-written: this slot starts afresh.
            llama_cpp.llama_memory_seq_rm(self._memory, active.slot, -1, -1)
            self._cached[active.slot] = []
            handle.events.put(("error", error))
            return
        if flush and reason != "cancelled":
            active.held.append(active.matcher.flush() + active.decoder.decode(b"", final=True))
        if any(active.held):
            if handle.request.stream:
                self._send_logprobs(active)
            handle.events.put(("text", "".join(active.held)))
        elif handle.request.stream:
            self._send_logprobs(active)
        ended = time.perf_counter_ns()
        first = active.first_token_at or ended
        prompt = handle.request.prompt
        handle.events.put((
            "done",
            GenerationResult(
                done_reason=reason,
                prompt_eval_count=len(prompt),
                prompt_eval_duration=max(first - active.started, 1),
                eval_count=len(active.generated),
                eval_duration=max(ended - first, 1),
                context=_context(handle.request) + active.generated,
                logprobs=active.logprobs,
            ),
        ))


def _text_tokens(req: SequenceRequest) -> list[int]:
    """The prompt's token ids without the placeholders of its images."""
    return req.prompt if req.media is None else [t for t in req.prompt if t >= 0]


def _context(req: SequenceRequest) -> list[int]:
    """What ``context`` reports: the prompt's tokens; a prompt with images has no token list to send back (its
    images' positions have no ids), so it reports none."""
    return req.prompt if req.media is None else []


def set_adapters(llama_cpp: Any, ctx: Any, adapters: list[Any]) -> None:
    """Apply LoRA ``adapters`` (scale 1, as Ollama applies a Modelfile's ADAPTER) to a llama.cpp context."""
    array = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
    scales = (ctypes.c_float * len(adapters))(*([1.0] * len(adapters)))
    if llama_cpp.llama_set_adapters_lora(ctx, array, len(adapters), scales):
        raise GenerationFailed("failed to apply the model's LoRA adapters")
