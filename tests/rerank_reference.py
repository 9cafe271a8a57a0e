"""A BERT cross-encoder in numpy, read from a GGUF: what llama.cpp's BERT graph with rank pooling computes, written
from the network's definition, so a test of corral's scores checks the network and not the tokenizer (the tokens
come from llama.cpp's own tokenizer, as the worker builds the pair).

The network (``BertForSequenceClassification`` as llama.cpp's converter writes it, ``build_pooling`` case RANK):

- input: token embedding + token type 0 (llama.cpp feeds every token type zero) + position embedding, LayerNorm;
- each layer, post-norm: multi-head self-attention over the whole pair (non-causal), output projection,
  residual, LayerNorm; GELU feed-forward, residual, LayerNorm;
- head: the first token's ([CLS]) row, ``cls`` dense + tanh, then ``cls.output``: one score per pair, unbounded
  (no sigmoid: llama.cpp's server returns the raw value too).

GELU is the tanh approximation, as ``ggml_gelu`` computes it.

Two precisions.  ``exact`` computes in float64.  ``ggml-cpu`` (the default: the tests run llama.cpp on CPUs)
also rounds where ggml's CPU backend does: GELU comes from a table indexed by the input rounded to f16, and the
table holds f16 values (``GGML_GELU_FP16``).  That alone moves the fixture's scores by up to ~1e-3; with it,
the reference and llama.cpp agree to ~1e-6.  Everything else (the products of f32 weights, the attention, which
rerank loads compute without flash attention, LayerNorm, the head) is f32 in llama.cpp and f64 here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


class ReferenceCrossEncoder:
    """Scores (query, document) token sequences with the weights of a BERT cross-encoder GGUF."""

    def __init__(self, path: Path, *, precision: str = "ggml-cpu") -> None:
        import gguf

        if precision not in ("ggml-cpu", "exact"):
            raise ValueError(f"unknown precision {precision!r}")
        self.ggml = precision == "ggml-cpu"
        reader = gguf.GGUFReader(path)
        self.weights: dict[str, np.ndarray] = {
            tensor.name: np.asarray(tensor.data, dtype=np.float64).reshape(
                [int(n) for n in reversed(tensor.shape)]
            )
            for tensor in reader.tensors
        }

        def number(key: str) -> float:
            field = reader.fields[key]
            return float(field.parts[field.data[0]][0])

        self.n_head = int(number("bert.attention.head_count"))
        self.n_layer = int(number("bert.block_count"))
        self.eps = number("bert.attention.layer_norm_epsilon")

    def score(self, tokens: list[int]) -> float:
        """The score of one pair, given its tokens ([CLS] q [SEP] d [SEP], or a template's)."""
        w = self.weights
        x = w["token_embd.weight"][tokens] + w["token_types.weight"][0] + w["position_embd.weight"][: len(tokens)]
        x = self._norm(x, "token_embd_norm")
        for i in range(self.n_layer):
            x = self._norm(x + self._attention(x, f"blk.{i}"), f"blk.{i}.attn_output_norm")
            up = _gelu(self._linear(x, f"blk.{i}.ffn_up"), f16=self.ggml)
            x = self._norm(x + self._linear(up, f"blk.{i}.ffn_down"), f"blk.{i}.layer_output_norm")
        head = np.tanh(self._linear(x[0], "cls"))
        return float(self._linear(head, "cls.output")[0])

    def scores(self, pairs: list[list[int]]) -> list[float]:
        return [self.score(tokens) for tokens in pairs]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        result: np.ndarray = x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]
        return result

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        result: np.ndarray = (x - mean) / np.sqrt(var + self.eps) * self.weights[f"{name}.weight"] + \
            self.weights[f"{name}.bias"]
        return result

    def _attention(self, x: np.ndarray, block: str) -> np.ndarray:
        n, width = x.shape
        head = width // self.n_head

        def heads(name: str) -> np.ndarray:  # (n_head, n, head)
            return self._linear(x, f"{block}.{name}").reshape(n, self.n_head, head).transpose(1, 0, 2)

        q, k, v = heads("attn_q"), heads("attn_k"), heads("attn_v")
        logits = q @ k.transpose(0, 2, 1) / math.sqrt(head)
        logits -= logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        mixed = weights @ v
        return self._linear(mixed.transpose(1, 0, 2).reshape(n, width), f"{block}.attn_output")


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def _gelu(x: np.ndarray, *, f16: bool) -> np.ndarray:
    if f16:
        x = _f16(x)
    result: np.ndarray = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return _f16(result) if f16 else result
