"""OpenAI's Files and Batches routes (``/v1/files``, ``/v1/batches``): thin views over :mod:`jobs.files` and
:mod:`jobs.batches`.  Uploads stream into the database part by part; file content streams back out."""

from __future__ import annotations

from flask import Blueprint, Response, request, stream_with_context

from api.auth import creator, owner, principal
from api.errors import json_response
from api.openapi import documented
from api.params import query_int
from api.services import services
from corral.errors import BadRequest
from corral.wire import responses as R
from corral.wire.jobs import BatchRequest, parse
from corral.wire.ollama import decode_json

bp = Blueprint("openai_batch", __name__)


@bp.post("/v1/files")
@documented(body=R.FileUpload, upload="multipart", response=R.FileObject)
def upload() -> Response:
    if request.mimetype != "multipart/form-data":
        raise BadRequest("expected a multipart/form-data upload with 'file' and 'purpose'")
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("'file' is a required field", param="file")
    purpose = request.form.get("purpose")
    if not purpose:
        raise BadRequest("'purpose' is a required field", param="purpose")
    created = services().files.create(upload.stream, filename=upload.filename or "upload.jsonl", purpose=purpose, owner=creator())
    return json_response(created)


@bp.get("/v1/files")
@documented(response=R.FileList, query=(("purpose", "string"), ("limit", "integer"), ("after", "string"), ("order", "string")))
def list_files() -> Response:
    return json_response(
        services().files.list(
            purpose=request.args.get("purpose") or None, limit=int(query_int("limit", 10000) or 0),
            after=request.args.get("after") or None, order=request.args.get("order", "desc"), owner=owner(),
        )
    )


@bp.get("/v1/files/<file_id>")
@documented(response=R.FileObject)
def get_file(file_id: str) -> Response:
    return json_response(services().files.get(file_id, owner()))


@bp.get("/v1/files/<file_id>/content")
@documented(media="application/octet-stream")
def file_content(file_id: str) -> Response:
    job_id, role = services().files.source(file_id, owner())
    body = services().batches.render(job_id, role) if job_id and role else services().files.chunks(file_id)
    return Response(stream_with_context(body), mimetype="application/octet-stream")


@bp.delete("/v1/files/<file_id>")
@documented(response=R.FileDeleted)
def delete_file(file_id: str) -> Response:
    return json_response(services().files.delete(file_id, owner()))


@bp.post("/v1/batches")
@documented(body=BatchRequest, response=R.Batch)
def create_batch() -> Response:
    body: BatchRequest = parse(BatchRequest, decode_json(request.get_data()))
    services().governor.check_budget(principal())
    created = services().batches.create(
        input_file_id=body.input_file_id, endpoint=body.endpoint, completion_window=body.completion_window,
        metadata=body.metadata, owner=creator(), quota=principal(), webhook_url=body.webhook_url,
    )
    return json_response(created)


@bp.get("/v1/batches")
@documented(response=R.BatchList, query=(("limit", "integer"), ("after", "string")))
def list_batches() -> Response:
    limit = query_int("limit", 20)
    if limit is None or not 1 <= limit <= 100:
        raise BadRequest("limit must be between 1 and 100", param="limit")
    return json_response(services().batches.list(after=request.args.get("after") or None, limit=limit, owner=owner()))


@bp.get("/v1/batches/<batch_id>")
@documented(response=R.Batch)
def get_batch(batch_id: str) -> Response:
    return json_response(services().batches.get(batch_id, owner()))


@bp.post("/v1/batches/<batch_id>/cancel")
@documented(response=R.Batch)
def cancel_batch(batch_id: str) -> Response:
    return json_response(services().batches.cancel(batch_id, owner()))
