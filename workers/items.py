"""A batch item as the worker runs it: its request (built by the sync routes' builder, corral/requests.py) or a
rerank item's fields, and a dry run's token count of a list of items, rendered exactly as a run renders them."""

from __future__ import annotations

import logging
from typing import Any

from corral.errors import BadRequest
from corral.modelstore.store import ModelRecord
from corral.protocol import BuildRequest, InferenceRequest
from corral.requests import build_request, item_fields
from corral.rerank import MAX_DOCUMENTS, MAX_QUERY_CHARS
from workers.rerank import pairs
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def item_request(record: ModelRecord, kind: str, name: str, options: dict[str, Any], body: dict[str, Any]) -> InferenceRequest:
    """The request a generate or chat item makes, built as the sync route builds it (corral/requests.py)."""
    return build_request(record, name, kind, **item_fields(options, body))


def rerank_fields(body: dict[str, Any]) -> tuple[str, list[str], bool]:
    """(query, documents, truncate) of a rerank item's stored body; checked again here (the API checked the line
    as it took the job), so a body that reached the worker some other way fails as its own item, not the chunk."""
    query, documents = body.get("query"), body.get("documents")
    if not isinstance(query, str):
        raise BadRequest('"query" must be a string')
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f'"query" is longer than {MAX_QUERY_CHARS} characters')
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise BadRequest('"documents" must be a non-empty array of strings')
    if len(documents) > MAX_DOCUMENTS:
        raise BadRequest(f'"documents" has {len(documents)} entries; at most {MAX_DOCUMENTS} are allowed')
    return query, documents, bool(body.get("truncate", True))


def count_tokens(runtime: WorkerRuntime, req: BuildRequest) -> list[int | None]:
    """Prompt tokens of each item of ``req`` (a dry run's batch), None for an item that would fail to render."""
    record = runtime.requests.record_for(req.model, req.model_digest)
    embedding, rank = req.kind == "embed", req.kind == "rerank"
    spec = runtime.requests.load_spec(record, req.options, embedding=embedding, rank=rank)
    counts: list[int | None] = []
    with runtime.registry.use(spec, record, req.model, runtime.settings.keep_alive) as (model, _):
        for body in req.items:
            try:
                if rank:
                    query, documents, truncate = rerank_fields(body)
                    counts.append(sum(len(t) for t in pairs(model, query, documents, truncate=truncate)))
                elif embedding:
                    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    counts.append(sum(len(t) for t in model.embed_tokens(inputs, truncate=bool(body.get("truncate", True)))))
                else:
                    request = item_request(record, req.kind, req.model, req.options, body)
                    prompt, _, _, media = runtime.requests.prompt_for(model, request, record)
                    counts.append(len(prompt))
                    if media is not None:
                        media.close()
            except Exception:  # CorralError or not, this item would fail: counted as failing, never the dry run
                log.debug("item does not render", exc_info=True)
                counts.append(None)
    return counts
