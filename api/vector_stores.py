"""OpenAI's Vector Stores routes (``/v1/vector_stores...``) over corral's collections, and corral's ``sync`` and
``reembed`` beside them.

Views are thin: parse the body with :mod:`corral.wire.vector_stores`, call the collection service
(:mod:`jobs.collections`) with the key as owner and quota, answer its dict.  Search is the one view that composes
services, as :meth:`api.services.Services.search_job` does: the store names its embedding model, the query is
embedded on a worker through the inference service (the key's limits and allow-list apply), the hybrid search runs
in :mod:`jobs.collection_search`, and a ``ranker`` that names a rerank model rescores the top candidates on a
reranker's worker.  The SDK sends ``OpenAI-Beta: assistants=v2`` with every call; nothing here reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flask import Blueprint, Response, request

from api.auth import creator, owner, principal
from api.errors import json_response
from api.openapi import documented
from api.params import query_int
from api.rerank import softmax_head
from api.services import services
from corral.errors import BadRequest, ModelNotFound
from corral.modelstore.store import ModelName, ModelRecord
from corral.rerank import sigmoid
from corral.wire import vector_stores as W
from corral.wire.ollama import decode_json
from corral.wire.openai import parse_request
from jobs import collection_search
from jobs.db import sessions

bp = Blueprint("vector_stores", __name__)
POLL_AFTER_MS = "500"  # what the SDK's *_and_poll helpers wait between reads (their default is 1000)
FILE_STATUSES = ("in_progress", "completed", "failed", "cancelled")
RERANK_POOL = 100  # candidates a rerank model rescores at most (4 x max_num_results below that)
LIST_QUERY = (("limit", "integer"), ("order", "string"), ("after", "string"), ("before", "string"))
STORE = "/v1/vector_stores/<store_id>"
# Times a search embeds its queries again when a re-embed switched its store's model meanwhile (a switch ends a
# whole re-embed job, so a second one within one search is already unlikely)
SWITCH_RETRIES = 2


def _body(model: type[Any]) -> Any:
    return parse_request(model, decode_json(request.get_data()))


def _paging() -> dict[str, Any]:
    """OpenAI's list parameters: ``limit`` 1..100 (20), ``order`` asc|desc (desc), ``after``/``before`` ids."""
    limit = query_int("limit", 20)
    if limit is None or not 1 <= limit <= 100:
        raise BadRequest("limit must be between 1 and 100", param="limit")
    order = request.args.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order")
    return {"limit": limit, "order": order, "after": request.args.get("after") or None,
            "before": request.args.get("before") or None}


def _file_paging() -> dict[str, Any]:
    status = request.args.get("filter") or None
    if status is not None and status not in FILE_STATUSES:
        raise BadRequest(f"filter must be one of {list(FILE_STATUSES)}", param="filter")
    return {**_paging(), "status": status}


def _polled(obj: dict[str, Any]) -> Response:
    """A file or batch: the SDK's poll helpers read ``openai-poll-after-ms`` for their next wait."""
    resp = json_response(obj)
    resp.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return resp


# -- stores ------------------------------------------------------------------------------------------------


@bp.post("/v1/vector_stores")
@documented(body=W.CreateStoreRequest, response=W.VectorStore)
def create_store() -> Response:
    body: W.CreateStoreRequest = _body(W.CreateStoreRequest)
    if body.file_ids:
        services().governor.check_budget(principal())
    created = services().collections.create(
        owner=creator(), name=body.name, description=body.description, model=body.model,
        chunking=W.chunking_of(body.chunking_strategy),
        expires_after=body.expires_after.model_dump() if body.expires_after else None,
        metadata=body.metadata, file_ids=body.file_ids or [], quota=principal(),
    )
    return json_response(created)


@bp.get("/v1/vector_stores")
@documented(response=W.VectorStoreList, query=LIST_QUERY)
def list_stores() -> Response:
    return json_response(services().collections.list(owner=owner(), **_paging()))


@bp.get(STORE)
@documented(response=W.VectorStore)
def get_store(store_id: str) -> Response:
    return json_response(services().collections.get(store_id, owner()))


@bp.post(STORE)
@documented(body=W.UpdateStoreRequest, response=W.VectorStore)
def update_store(store_id: str) -> Response:
    body: W.UpdateStoreRequest = _body(W.UpdateStoreRequest)
    return json_response(services().collections.update(store_id, owner(), body.changes()))


@bp.delete(STORE)
@documented(response=W.Deleted)
def delete_store(store_id: str) -> Response:
    return json_response(services().collections.delete(store_id, owner()))


# -- files -------------------------------------------------------------------------------------------------


@bp.post(f"{STORE}/files")
@documented(body=W.CreateFileRequest, response=W.VectorStoreFile)
def add_file(store_id: str) -> Response:
    body: W.CreateFileRequest = _body(W.CreateFileRequest)
    services().governor.check_budget(principal())
    spec = body.spec()
    return _polled(services().collections.add_file(store_id, owner(), spec.file_id, spec.attributes, spec.chunking,
                                                   principal()))


@bp.get(f"{STORE}/files")
@documented(response=W.VectorStoreFileList, query=(*LIST_QUERY, ("filter", "string")))
def list_files(store_id: str) -> Response:
    return json_response(services().collections.list_files(store_id, owner(), **_file_paging()))


@bp.get(f"{STORE}/files/<file_id>")
@documented(response=W.VectorStoreFile)
def get_file(store_id: str, file_id: str) -> Response:
    return _polled(services().collections.get_file(store_id, owner(), file_id))


@bp.post(f"{STORE}/files/<file_id>")
@documented(body=W.UpdateFileRequest, response=W.VectorStoreFile)
def update_file(store_id: str, file_id: str) -> Response:
    body: W.UpdateFileRequest = _body(W.UpdateFileRequest)
    return json_response(services().collections.update_file(store_id, owner(), file_id, body.attributes))


@bp.delete(f"{STORE}/files/<file_id>")
@documented(response=W.Deleted)
def delete_file(store_id: str, file_id: str) -> Response:
    return json_response(services().collections.delete_file(store_id, owner(), file_id))


@bp.get(f"{STORE}/files/<file_id>/content")
@documented(response=W.FileContentPage)
def file_content(store_id: str, file_id: str) -> Response:
    return json_response(services().collections.file_content(store_id, owner(), file_id))


# -- file batches ------------------------------------------------------------------------------------------


@bp.post(f"{STORE}/file_batches")
@documented(body=W.CreateFileBatchRequest, response=W.FileBatch)
def create_batch(store_id: str) -> Response:
    body: W.CreateFileBatchRequest = _body(W.CreateFileBatchRequest)
    services().governor.check_budget(principal())
    return _polled(services().collections.create_batch(store_id, owner(), body.specs(), principal()))


@bp.get(f"{STORE}/file_batches/<batch_id>")
@documented(response=W.FileBatch)
def get_batch(store_id: str, batch_id: str) -> Response:
    return _polled(services().collections.get_batch(store_id, owner(), batch_id))


@bp.post(f"{STORE}/file_batches/<batch_id>/cancel")
@documented(response=W.FileBatch)
def cancel_batch(store_id: str, batch_id: str) -> Response:
    return _polled(services().collections.cancel_batch(store_id, owner(), batch_id))


@bp.get(f"{STORE}/file_batches/<batch_id>/files")
@documented(response=W.VectorStoreFileList, query=(*LIST_QUERY, ("filter", "string")))
def list_batch_files(store_id: str, batch_id: str) -> Response:
    collections = services().collections
    collections.get_batch(store_id, owner(), batch_id)  # an unknown batch is a 404, not an empty list
    return json_response(collections.list_files(store_id, owner(), **_file_paging(), batch_id=batch_id))


# -- corral's own: sync and reembed ------------------------------------------------------------------------


@bp.post(f"{STORE}/sync")
@documented(body=W.SyncRequest, response=W.SyncReport)
def sync(store_id: str) -> Response:
    body: W.SyncRequest = _body(W.SyncRequest)
    services().governor.check_budget(principal())
    return json_response(services().collections.sync(store_id, owner(), mode=body.mode,
                                                     documents=body.sync_documents(), quota=principal()))


@bp.post(f"{STORE}/reembed")
@documented(body=W.ReembedRequest, response=W.ReembedReport)
def reembed(store_id: str) -> Response:
    body: W.ReembedRequest = _body(W.ReembedRequest)
    services().governor.check_budget(principal())
    return json_response(services().collections.reembed(store_id, owner(), body.model, principal()))


# -- search ------------------------------------------------------------------------------------------------


@bp.post(f"{STORE}/search")
@documented(body=W.SearchRequest, response=W.SearchResultsPage)
def search(store_id: str) -> Response:
    return json_response(search_page(store_id, owner(), _body(W.SearchRequest)))


def search_page(store_id: str, who: str | None, body: W.SearchRequest) -> dict[str, Any]:
    """A search's ``vector_store.search_results.page``: the route's answer, and what the console's search box shows.

    The queries are embedded before the search's snapshot opens (a worker's round trip, kept out of a database
    transaction).  A re-embed that switches the store's model in between would leave the snapshot holding only the
    new model's chunks and an empty page: the search notices and embeds its queries again with the new model."""
    queries, options = body.queries(), body.options()
    reranker = _reranker(options.rerank_model) if options.rerank_model else None
    shared = services()
    embedding_weight, text_weight = body.weights()
    k = body.max_num_results
    pool = min(RERANK_POOL, 4 * k) if reranker else k
    rows: list[dict[str, Any]] | None = None
    for attempt in range(SWITCH_RETRIES + 1):
        target = shared.collections.search_target(store_id, who)
        vectors = _embed(target.model, queries) if embedding_weight > 0 else []
        with collection_search.snapshot(sessions(shared.settings)) as reads:  # the legs and the hydrate: one view
            with reads() as session:
                switched = collection_search.searched_digest(session, target.collection_id) != target.model_digest
            if switched and attempt < SWITCH_RETRIES:
                continue
            hits = collection_search.search(
                reads, collection_id=target.collection_id, model_digest=target.model_digest,
                query_vectors=vectors, query_texts=queries, filters=body.filter_dict(), k=pool,
                embedding_weight=embedding_weight, text_weight=text_weight,
            )
            with reads() as session:
                rows = collection_search.hydrate(session, hits)
        break
    assert rows is not None
    if reranker is not None and rows:
        rows = _reranked(reranker, options.ranker, "\n".join(queries), rows)
    kept = [row for row in rows if row["score"] >= options.score_threshold][:k]
    return {
        "object": "vector_store.search_results.page", "search_query": queries,
        "data": [_hit(row) for row in kept], "has_more": False, "next_page": None,
    }


def _embed(model: str, queries: list[str]) -> list[np.ndarray]:
    """Each query embedded with the store's model on a worker (as ``Services.search_job`` embeds a job's query);
    ``search_target`` has checked that the model still has the digest the store's vectors were made with."""
    svc = services().inference
    record = svc.model(model)
    data, _ = svc.single(svc.request(record, model, "embed", inputs=queries, truncate=True))
    return [np.asarray(vector, dtype=np.float32) for vector in data["embeddings"]]


def _reranker(name: str) -> ModelRecord:
    """The rerank model a ``ranker`` names: a 400 naming the option when it is none, or not a reranker."""
    param = "ranking_options.ranker"
    try:
        record = services().inference.model(name)
    except (ModelNotFound, BadRequest) as exc:
        raise BadRequest(f"ranker '{name}' is neither one of {list(W.OPENAI_RANKERS)} nor a model on this server",
                         param=param) from exc
    if "rerank" not in record.capabilities:
        raise BadRequest(f"ranker {ModelName.parse(name).display} is not a rerank model (it has no classifier head)",
                         param=param)
    return record


def _reranked(record: ModelRecord, name: str, query: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` rescored by the rerank model, as 0..1 relevances (a logit through a sigmoid; a softmax head's score
    as it is), best first; equal scores keep the fused order."""
    svc = services().inference
    data, _ = svc.single(svc.request(record, name, "rerank", query=query, documents=[row["text"] for row in rows],
                                     truncate=True))
    keep = softmax_head(record)
    scores = [float(s) if keep else sigmoid(float(s)) for s in data["scores"]]
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], i))
    return [{**rows[i], "score": min(1.0, max(0.0, scores[i]))} for i in order]


def _hit(row: dict[str, Any]) -> dict[str, Any]:
    """One search result in OpenAI's shape, with corral's extras (where in which source it came from)."""
    return {
        "file_id": row["file_id"], "filename": row["filename"] or "", "score": float(row["score"]),
        "attributes": row["attributes"], "content": [{"type": "text", "text": row["text"]}],
        "source_id": row["source_id"], "chunk_index": row["seq"], "start": row["start"], "end": row["end"],
    }
