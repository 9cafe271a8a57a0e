"""Reranking's shared rules: the bounds a request is checked against, and how scores become ranked results.

The worker scores every (query, document) pair in the order the client sent the documents (workers/rerank.py);
the sync routes (api/rerank.py) and rerank job items (workers/batch.py) then rank those scores here, so a job
line and the same body sent to ``/v1/rerank`` give the same ``results``.

Scores are what llama.cpp's server returns: the classifier head's raw first output (``embd[0]``), unbounded
logits for BERT-family cross-encoders, 0..1 for a model whose graph ends in a softmax (Qwen3-Reranker).  Cohere's
``/v2/rerank`` documents its scores as 0..1, so that route maps logits through a sigmoid (:func:`sigmoid`).
"""

from __future__ import annotations

import math
from typing import Any

MAX_DOCUMENTS = 1000  # documents in one request or job line (llama.cpp's server has no bound; we must)
MAX_QUERY_CHARS = 64 * 1024


def sigmoid(score: float) -> float:
    """A logit as a 0..1 relevance (Cohere's range); a score already in 0..1 from a softmax head is kept."""
    if score >= 0:
        return 1.0 / (1.0 + math.exp(-score))
    z = math.exp(score)
    return z / (1.0 + z)


def ranked(
    scores: list[float], *, top_n: int | None = None, documents: list[str] | None = None,
    document_as_object: bool = False,
) -> list[dict[str, Any]]:
    """``results`` sorted by descending score (ties keep the documents' order), cut to ``top_n``; each with
    its ``document`` when ``documents`` is given: the text (llama.cpp/Jina), or ``{"text": ...}`` (Cohere,
    Jina v2, vLLM) with ``document_as_object``."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None and top_n >= 0:
        order = order[:top_n]
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if documents is not None:
            result["document"] = {"text": documents[index]} if document_as_object else documents[index]
        results.append(result)
    return results
