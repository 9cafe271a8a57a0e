"""Anthropic's Message Batches routes (``/v1/messages/batches``): thin views over :mod:`jobs.message_batches`.

``results_url`` is absolute, built from the URL the client called (the SDK GETs it as given), and the results
stream out as JSONL rendered from the job's items.  Errors are Anthropic's (every path is under
``/v1/messages``).
"""

from __future__ import annotations

from flask import Blueprint, Response, request, stream_with_context

from api.auth import creator, owner, principal
from api.errors import json_response
from api.openapi import documented
from api.params import query_int
from api.services import services
from corral.errors import BadRequest
from corral.wire import responses as R
from corral.wire.anthropic import BatchCreate, parse
from corral.wire.ollama import decode_json
from jobs.db import read_after_commit
from jobs.message_batches import MessageBatches

bp = Blueprint("anthropic_batch", __name__)


def _batches() -> MessageBatches:
    shared = services()
    return MessageBatches(shared.store, shared.jobs)


def _base() -> str:
    return request.host_url


@bp.post("/v1/messages/batches")
@documented(body=BatchCreate, response=R.MessageBatch)
def create_batch() -> Response:
    body: BatchCreate = parse(BatchCreate, decode_json(request.get_data()))
    services().governor.check_budget(principal())
    ident = _batches().create(body, owner=creator(), quota=principal())
    who, base = creator(), _base()  # stored: the reply waits out an outage rather than invite a second batch
    return json_response(read_after_commit(lambda: _batches().get(ident, who, base), f"the reply for batch {ident}"))


@bp.get("/v1/messages/batches")
@documented(response=R.MessageBatchPage, query=(("before_id", "string"), ("after_id", "string"), ("limit", "integer")))
def list_batches() -> Response:
    limit = query_int("limit", 20)
    if limit is None or not 1 <= limit <= 1000:
        raise BadRequest("limit: must be between 1 and 1000")
    return json_response(_batches().list(
        before_id=request.args.get("before_id") or None, after_id=request.args.get("after_id") or None,
        limit=limit, owner=owner(), base_url=_base()))


@bp.get("/v1/messages/batches/<batch_id>")
@documented(response=R.MessageBatch)
def get_batch(batch_id: str) -> Response:
    return json_response(_batches().get(batch_id, owner(), _base()))


@bp.post("/v1/messages/batches/<batch_id>/cancel")
@documented(response=R.MessageBatch)
def cancel_batch(batch_id: str) -> Response:
    return json_response(_batches().cancel(batch_id, owner(), _base()))


@bp.delete("/v1/messages/batches/<batch_id>")
@documented(response=R.MessageBatchDeleted)
def delete_batch(batch_id: str) -> Response:
    return json_response(_batches().delete(batch_id, owner()))


@bp.get("/v1/messages/batches/<batch_id>/results")
@documented(media="application/binary")
def batch_results(batch_id: str) -> Response:
    lines = _batches().results(batch_id, owner())
    return Response(stream_with_context(lines), mimetype="application/binary")
