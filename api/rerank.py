"""Rerank routes: llama.cpp's and Jina's (``/v1/rerank`` and its aliases, TEI's body too) and Cohere's v2.

Ollama has no rerank (ollama/ollama#3368).  These routes take the bodies the rerank clients send
(corral/wire/rerank.py), run one ``rerank`` request on a reranker's worker through the same gateway as every other
interactive request (the key's allow-list, limits and token budget included), and rank the scores it returns.
Errors are OpenAI's shape under ``/v1/`` and on llama.cpp's aliases, Cohere's on ``/v2/`` (api/errors.py).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from api.errors import json_response
from api.openapi import documented
from api.services import services
from corral.errors import BadRequest
from corral.modelstore.store import ModelName, ModelRecord
from corral.wire import responses as R
from corral.wire.ollama import decode_json
from corral.wire.rerank import CohereRerankRequest, RerankRequest, parse_rerank

bp = Blueprint("rerank", __name__)


def _reranker(name: str) -> ModelRecord:
    record = services().inference.model(name)
    if "rerank" not in record.capabilities:
        raise BadRequest(
            f"{ModelName.parse(name).display} is not a reranker: it has no classifier head (rank pooling); "
            "create one from a cross-encoder GGUF", param="model")
    return record


def _score(req: RerankRequest) -> tuple[ModelRecord, list[str], list[float], int]:
    query, documents = req.checked_query(), req.checked_documents()
    record = _reranker(req.model)
    svc = services().inference
    data, _ = svc.single(svc.request(record, req.model, "rerank", query=query, documents=documents,
                                     truncate=req.truncate, options=req.options, keep_alive=req.keep_alive))
    scores = [float(s) for s in data["scores"]]
    return record, documents, scores, int(data.get("prompt_eval_count") or 0)


@bp.post("/v1/rerank")
@bp.post("/v1/reranking")
@bp.post("/rerank")
@bp.post("/reranking")
@documented(body=RerankRequest, response=R.RerankList)
def rerank() -> Response:
    req = parse_rerank(RerankRequest, decode_json(request.get_data()))
    _, documents, scores, tokens = _score(req)
    return json_response(req.reply(scores, documents, tokens))


@bp.post("/v2/rerank")
@documented(body=CohereRerankRequest, response=R.CohereRerank)
def cohere_rerank() -> Response:
    req: Any = parse_rerank(CohereRerankRequest, decode_json(request.get_data()))
    record, documents, scores, tokens = _score(req)
    return json_response(req.reply(scores, documents, tokens, softmax_head=softmax_head(record)))


def softmax_head(record: ModelRecord) -> bool:
    """A head with labels (Qwen3-Reranker's yes/no) ends in a softmax: its scores are 0..1 already."""
    arch = str(record.config.get("model_family") or "")
    return f"{arch}.classifier.output_labels" in (record.config.get("model_info") or {})
