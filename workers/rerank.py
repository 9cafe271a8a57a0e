"""Reranking on a worker: a cross-encoder scores each (query, document) pair, many pairs per ``llama_decode``.

llama-cpp-python loads rank pooling (``LLAMA_POOLING_TYPE_RANK``) but has no call that uses it, and its
``Llama.embed()`` misreads a rank model's output (it reads ``n_embd`` floats where llama.cpp wrote
``n_cls_out``), so corral builds the pairs and reads the scores itself:

- **Pairs** are built as llama.cpp's server builds them (``format_prompt_rerank``): with the GGUF's ``rerank``
  chat template (Qwen3-Reranker) its ``{query}`` and ``{document}`` are substituted and the text tokenized with
  special tokens parsed; without one, ``[BOS] query [EOS] [SEP] document [EOS]``, each marker only where the
  vocabulary asks for it (``add_bos``/``add_eos``/``add_sep``), query and document tokenized as plain text.  Unlike
  the server, user text never becomes a special token: a query or document that spells one (``[SEP]``,
  ``<|im_end|>``) is tokenized apart from the template, as text.
- **Too long**: the document is cut, never the query (``truncate: false`` makes it a 400 instead); a query that
  leaves no room for any document is a 400 either way.
- **Scores** are the head's first output for each pair (``llama_get_embeddings_seq``, ``n_cls_out`` floats):
  raw logits for BERT-family heads, 0..1 for a softmax head, as llama.cpp's server returns them.  The pairs are
  packed like embedding inputs (:meth:`workers.engine.LoadedModel.pooled`), on the compute thread.

A model is a reranker when its GGUF has a classifier head (``cls`` or ``cls.output``): llama.cpp aborts the
process when asked for rank pooling on a model without one, and ``llama_model_n_cls_out`` is undefined there, so
the file is checked before a rank load (:func:`require_reranker`), once per blob.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import BadRequest, ContextLengthExceeded, GenerationFailed
from corral.modelstore.gguf_meta import CLASSIFIER_HEADS, read_header

if TYPE_CHECKING:
    from workers.engine import LoadedModel

# Tokens per decode on a CPU.  A CPU computes a pair of a hundred tokens at full speed alone, and the attention of
# a packed decode grows with the square of its tokens: measured on one thread, 6-layer 384-wide BERT, pairs/s at
# 32/64/128/256/512 tokens per decode: 15-token pairs 74/79/77/69/52, 45-token 34/34/33/31/22, 100-token
# 16/16/16/15/11.  On a GPU (not measured here) one decode of thousands of tokens costs about what one of a
# hundred does, so a decode takes the whole micro-batch there.
CPU_PACK_TOKENS = 128
PLACEHOLDER = re.compile(r"(\{query\}|\{document\})")


def has_classifier_head(path: Path) -> bool:
    """Whether the GGUF at ``path`` carries a classifier head (read from its header once per file: a blob's
    content never changes; a file that cannot be read now is not remembered)."""
    try:
        return _head_in(path)
    except (OSError, ValueError):
        return False


@lru_cache(maxsize=64)
def _head_in(path: Path) -> bool:
    names = {name for name, _ in read_header(path, with_arrays=False).tensors}
    return bool(CLASSIFIER_HEADS & names)


def require_reranker(path: Path, name: str) -> None:
    """Refuse, with a 400, to rank with a model that has no classifier head (an embedding or chat model)."""
    if not has_classifier_head(path):
        raise BadRequest(f"model '{name}' is not a reranker: it has no classification head to score documents "
                         "with (use a cross-encoder such as bge-reranker)")


@dataclass(frozen=True)
class PairFormat:
    """How one model's pairs are laid out: its ``rerank`` template, else the markers its vocabulary adds."""

    template: str | None
    bos: int | None  # before the query
    eos: int | None  # after the query and after the document
    sep: int | None  # between the query's EOS and the document
    n_cls_out: int  # floats the head writes per pair

    @classmethod
    def of(cls, llama_cpp: Any, model: Any) -> PairFormat:
        """Read from a model llama.cpp has loaded (with a classifier head: see :func:`require_reranker`)."""
        vocab = llama_cpp.llama_model_get_vocab(model)
        raw = llama_cpp.llama_model_chat_template(model, b"rerank")
        eos = int(llama_cpp.llama_vocab_eos(vocab))
        sep = int(llama_cpp.llama_vocab_sep(vocab))
        eos = eos if eos >= 0 else sep  # llama.cpp: SEP when the vocabulary has no EOS

        def token(add: Any, value: int) -> int | None:
            return value if bool(add(vocab)) and value >= 0 else None

        return cls(
            template=raw.decode("utf-8", errors="replace") if raw else None,
            bos=token(llama_cpp.llama_vocab_get_add_bos, int(llama_cpp.llama_vocab_bos(vocab))),
            eos=token(llama_cpp.llama_vocab_get_add_eos, eos),
            sep=token(llama_cpp.llama_vocab_get_add_sep, sep),
            n_cls_out=max(1, int(llama_cpp.llama_model_n_cls_out(model))),
        )


class PairBuilder:
    """Token lists of (query, document) pairs for one model, each at most ``limit`` tokens."""

    def __init__(self, model: LoadedModel, form: PairFormat) -> None:
        self.model = model
        self.form = form
        self.limit = model.spec.n_ctx  # the micro-batch: a non-causal pair must fit in one (engine.py)

    def text(self, text: str) -> list[int]:
        return list(self.model.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def special(self, text: str) -> list[int]:
        return list(self.model.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def pairs(self, query: str, documents: list[str], *, truncate: bool) -> list[list[int]]:
        if self.form.template is not None:
            return self._templated(self.form.template, query, documents, truncate=truncate)
        form = self.form
        head = [*_opt(form.bos), *self.text(query), *_opt(form.eos), *_opt(form.sep)]
        tail = _opt(form.eos)
        room = self.limit - len(head) - len(tail)
        if room < 1:
            raise ContextLengthExceeded(self._query_too_long(len(head) + len(tail)))
        return [[*head, *self._cut(self.text(doc), room, truncate), *tail] for doc in documents]

    def _templated(self, template: str, query: str, documents: list[str], *, truncate: bool) -> list[list[int]]:
        """The template's text with the pair substituted, tokenized with special tokens parsed, as llama.cpp's
        server does; piece by piece (the template's own text with special tokens, the query's and document's as
        plain text) when the query or a document would spell a special token, or when the document is cut."""
        parts = PLACEHOLDER.split(template)
        literal = [self.special(part) if i % 2 == 0 else [] for i, part in enumerate(parts)]
        query_tokens = self.text(query)
        query_plain = self.special(query) == query_tokens
        fixed = sum(len(tokens) for tokens in literal) + parts.count("{query}") * len(query_tokens)
        occurrences = parts.count("{document}")
        room = (self.limit - fixed) // max(1, occurrences)
        if (occurrences and room < 1) or fixed > self.limit:
            raise ContextLengthExceeded(self._query_too_long(fixed))
        out = []
        for doc in documents:
            doc_tokens = self.text(doc)
            if query_plain and len(doc_tokens) <= room and self.special(doc) == doc_tokens:
                # substituted in one pass: a query that spells "{document}" stays as it is
                whole = self.special("".join(part if i % 2 == 0 else query if part == "{query}" else doc
                                             for i, part in enumerate(parts)))
                if len(whole) <= self.limit:
                    out.append(whole)
                    continue
            doc_tokens = self._cut(doc_tokens, room, truncate)
            pair: list[int] = []
            for i, part in enumerate(parts):
                pair.extend(literal[i] if i % 2 == 0 else query_tokens if part == "{query}" else doc_tokens)
            out.append(pair)
        return out

    def _cut(self, tokens: list[int], room: int, truncate: bool) -> list[int]:
        if len(tokens) <= room:
            return tokens
        if not truncate:
            raise ContextLengthExceeded(
                f"a document of {len(tokens)} tokens does not fit the context ({self.limit} tokens for the pair) "
                "and truncate is false"
            )
        return tokens[:room]

    def _query_too_long(self, used: int) -> str:
        return (f"the query takes {used} of the context's {self.limit} tokens and leaves no room for a document: "
                "shorten the query or load the model with a larger num_ctx")


def _opt(token: int | None) -> list[int]:
    return [] if token is None else [token]


def pairs(model: LoadedModel, query: str, documents: list[str], *, truncate: bool) -> list[list[int]]:
    """The token lists of ``query`` paired with each document, on a model loaded with rank pooling."""
    return PairBuilder(model, _format(model)).pairs(query, documents, truncate=truncate)


def score_pairs(model: LoadedModel, token_lists: list[list[int]], cancelled: Callable[[], bool] | None = None) -> list[float]:
    """The first head output of each pair, packed many pairs per decode (up to :data:`CPU_PACK_TOKENS` on a CPU,
    the whole micro-batch on a GPU); NaN or Inf is a failure, not a score.  ``cancelled`` is asked between
    decodes (engine.py)."""
    if not token_lists:
        return []
    form = _format(model)
    pack = model.spec.n_ctx if model.spec.n_gpu_layers != 0 else CPU_PACK_TOKENS
    rows = model.pooled(token_lists, width=form.n_cls_out, pack_tokens=pack, cancelled=cancelled)
    values = [float(s) for s in rows[:, 0]]
    if not all(math.isfinite(v) for v in values):
        raise GenerationFailed("the model returned a NaN or infinite score")
    return values


def rerank(model: LoadedModel, query: str, documents: list[str], *, truncate: bool,
           cancelled: Callable[[], bool] | None = None) -> tuple[list[float], int]:
    """(one score per document, in their order; tokens in all pairs)."""
    token_lists = pairs(model, query, documents, truncate=truncate)
    return score_pairs(model, token_lists, cancelled), sum(len(p) for p in token_lists)


def _format(model: LoadedModel) -> PairFormat:
    if model.pair_format is None:
        raise BadRequest("this model is not loaded for reranking")
    return model.pair_format
