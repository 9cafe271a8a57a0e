"""Rerank requests and replies in the shapes rerank clients send: llama.cpp's server and Jina (``/v1/rerank``,
``/rerank``), Hugging Face TEI (the same routes, with ``texts``), and Cohere v2 (``/v2/rerank``).

All three become one :class:`~corral.protocol.InferenceRequest` of kind ``rerank`` (corral/requests.py): a query,
the documents as plain strings, and ``truncate``.  The worker scores the pairs in the documents' order
(workers/rerank.py); :func:`corral.rerank.ranked` sorts them.  What differs is the edges:

- llama.cpp answers ``{model, object: "list", usage, results: [{index, relevance_score}]}``, raw logits, and
  ignores ``return_documents``; Jina's API takes ``return_documents`` and puts ``document: {text}`` in each
  result.  corral does what Jina does (llama.cpp's clients never ask for documents, so they see llama.cpp's shape).
- A body with ``texts`` instead of ``documents`` is TEI's: the reply is a bare array ``[{index, score, text?}]``,
  as llama.cpp's server answers it.
- Cohere requires ``model``, documents its scores as 0..1 (a sigmoid of the logit here, unless the head already
  ends in a softmax), and answers ``{id, results, meta}``.

Every value is bounded here, before anything is queued: at most :data:`~corral.rerank.MAX_DOCUMENTS`
documents, strings only (or Jina's and Cohere v1's ``{text}`` objects), a non-negative ``top_n``.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field, field_validator

from corral.errors import BadRequest
from corral.options import RuntimeRequest
from corral.rerank import MAX_DOCUMENTS, MAX_QUERY_CHARS, ranked, sigmoid
from corral.wire.openai import parse_request


def query_of(value: Any) -> str:
    """The query: a string of at most :data:`~corral.rerank.MAX_QUERY_CHARS` (llama.cpp's messages)."""
    if value is None:
        raise BadRequest('"query" must be provided', param="query")
    if not isinstance(value, str):
        raise BadRequest('"query" must be a string', param="query")
    if len(value) > MAX_QUERY_CHARS:
        raise BadRequest(f'"query" is too long: at most {MAX_QUERY_CHARS} characters', param="query")
    return value


def documents_of(value: Any, field: str) -> list[str]:
    """Documents as strings: a non-empty list of strings or ``{"text": str}`` objects (llama.cpp's message)."""
    wrong = BadRequest(f'"{field}" must be a non-empty string array', param=field)
    if not isinstance(value, list) or not value:
        raise wrong
    if len(value) > MAX_DOCUMENTS:
        raise BadRequest(f'too many {field}: {len(value)}; at most {MAX_DOCUMENTS} per request (use a rerank job '
                         'for more)', param=field)
    texts = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise wrong
        texts.append(item)
    return texts


class RerankRequest(RuntimeRequest):
    """POST /v1/rerank, /rerank, /reranking, /v1/reranking (llama.cpp and Jina; TEI with ``texts``) and, with
    :class:`CohereRerankRequest`'s edges, /v2/rerank."""

    query: Any = Field(None, description="The text every document is scored against.")
    documents: Any = Field(None, description="Strings, or `{text}` objects; at most 1,000.")
    texts: Any = Field(None, description="TEI's name for `documents`: the reply is then TEI's bare array.")
    top_n: int | None = Field(None, ge=0, description="Keep the best `top_n` results (default: all).")
    return_documents: bool = Field(False, description="Put each result's document in it (Jina's `document.text`).")
    return_text: bool = Field(False, description="TEI: put each result's `text` in it.")
    truncate: bool = Field(True, description="Cut a document that does not fit the context with the query "
                                             "(false: such a pair is a 400).")

    @field_validator("top_n", mode="before")
    @classmethod
    def _top_n(cls, value: Any) -> Any:
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ValueError("top_n must be an integer")
        return value

    @property
    def tei(self) -> bool:
        return self.documents is None and self.texts is not None

    def checked_query(self) -> str:
        return query_of(self.query)

    def checked_documents(self) -> list[str]:
        return documents_of(self.texts, "texts") if self.tei else documents_of(self.documents, "documents")

    def reply(self, scores: list[float], documents: list[str], prompt_tokens: int) -> Any:
        """llama.cpp's and Jina's reply (or TEI's bare array), best first."""
        if self.tei:
            return [
                {"index": r["index"], "score": r["relevance_score"], **({"text": documents[r["index"]]}
                                                                        if self.return_text else {})}
                for r in ranked(scores, top_n=self.top_n)
            ]
        results = ranked(scores, top_n=self.top_n, documents=documents if self.return_documents else None,
                         document_as_object=True)
        return rerank_reply(self.model, {"results": results, "prompt_eval_count": prompt_tokens})


class CohereRerankRequest(RerankRequest):
    """POST /v2/rerank: Cohere's v2 body (``model`` required; ``max_tokens_per_doc`` and ``priority`` taken)."""

    max_tokens_per_doc: int | None = Field(None, ge=1, description="Accepted; documents are cut to the context.")
    priority: int | None = Field(None, ge=0, le=999, description="Accepted and ignored (corral orders its queues).")

    def reply(self, scores: list[float], documents: list[str], prompt_tokens: int, *,
              softmax_head: bool = False) -> dict[str, Any]:
        relevance = scores if softmax_head else [sigmoid(s) for s in scores]
        results = ranked(relevance, top_n=self.top_n, documents=documents if self.return_documents else None,
                         document_as_object=True)
        return {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                     "tokens": {"input_tokens": prompt_tokens, "output_tokens": 0}},
        }


def parse_rerank(model: type[RerankRequest], data: Any) -> RerankRequest:
    """Validate a decoded body as the OpenAI routes do (a 400 naming the field); ``model`` is required."""
    req: RerankRequest = parse_request(model, data)
    if not req.model:
        raise BadRequest("model is required", param="model")
    return req


def rerank_reply(model: str, output: dict[str, Any]) -> dict[str, Any]:
    """A rerank job item's stored result (``{results, prompt_eval_count}``, ranked by the worker) as the body
    ``/v1/rerank`` answers: the line of ``/api/jobs/{id}/results`` and of an OpenAI batch's output file."""
    tokens = int(output.get("prompt_eval_count") or 0)
    return {"model": model, "object": "list", "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": output.get("results") or []}
