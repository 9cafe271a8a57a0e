"""The pure parts of decoding one sequence, apart from the loop that schedules many (workers/decode_loop.py):
stop strings held back until they cannot start a stop, the sampler chain llama-cpp-python builds, and a token's
log-probabilities in Ollama's shape."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from corral.options import SamplingOptions


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


def sampler_chain(llama_cpp: Any, vocab: Any, n_vocab: int, o: SamplingOptions, grammar: Any, seed: int) -> Any:
    """The same chain llama-cpp-python's ``Llama.generate`` builds, one per sequence: penalties, the grammar,
    then greedy, or top-k, typical, top-p, min-p, temperature and a seeded draw."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
    add(llama_cpp.llama_sampler_init_penalties(
        n_vocab, o.repeat_last_n, o.repeat_penalty, o.frequency_penalty, o.presence_penalty,
    ))
    if grammar is not None:
        compiled = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"),
                                                        grammar._root.encode("utf-8"))
        if not compiled:
            llama_cpp.llama_sampler_free(chain)
            raise ValueError("the grammar could not be compiled")
        add(compiled)
    if o.temperature <= 0.0:
        add(llama_cpp.llama_sampler_init_greedy())
    else:
        add(llama_cpp.llama_sampler_init_top_k(o.top_k))
        add(llama_cpp.llama_sampler_init_typical(o.typical_p, 1))
        add(llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(o.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(o.temperature))
        add(llama_cpp.llama_sampler_init_dist(seed if seed >= 0 else random.getrandbits(31)))
    return chain


def token_logprobs(logits: np.ndarray, token: int, top: int, detokenize: Callable[[list[int]], bytes]) -> dict[str, Any]:
    """The chosen token's log-probability under the model's own ``logits`` (before sampling changes them:
    temperature, penalties, grammar), and the ``top`` most likely tokens', in Ollama's shape."""
    values = logits.astype(np.float64)
    peak = float(values.max())
    normaliser = peak + float(np.log(np.exp(values - peak).sum()))

    def entry(t: int) -> dict[str, Any]:
        raw = bytes(detokenize([t]))
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(values[t]) - normaliser,
                "bytes": list(raw)}

    chosen = entry(token)
    if top > 0:
        best = np.argpartition(-values, top)[:top]
        best = best[np.argsort(-values[best], kind="stable")]
        chosen["top_logprobs"] = [entry(int(t)) for t in best]
    return chosen
