"""Batch-job routes (``/api/jobs``, ``/api/queue``), Ollama-style JSON with ``{"error": ...}`` errors.

``POST /api/jobs`` takes either a JSON body ``{kind, model, options?, chunk_size?, metadata?, items: [...]}``
or a JSONL upload (``Content-Type: application/x-ndjson``, job fields as query parameters) that is read line by
line straight into the database, so its size is bounded by disk, not memory.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import Blueprint, Response, request, stream_with_context

from api.auth import creator, owner, principal
from api.errors import dumps, json_response
from api.openapi import NDJSON, documented
from api.params import query_flag, query_int, query_json
from api.services import services
from api.streaming import NDJSON_MIMETYPE
from corral.errors import BadRequest
from corral.options import parse_options
from corral.wire import responses as R
from corral.wire.jobs import JobSubmission, parse
from corral.wire.ollama import decode_json
from jobs.ingest import read_jsonl, text_lines, validated

bp = Blueprint("jobs", __name__)
STREAMED_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines", "text/plain"}


@bp.post("/api/jobs")
@documented(
    body=JobSubmission, response=R.JobView, status=202, upload=NDJSON,
    query=(("kind", "string"), ("model", "string"), ("chunk_size", "integer"), ("options", "string"), ("metadata", "string"),
           ("webhook_url", "string"), ("cache", "boolean"), ("dry_run", "boolean"), ("completion_window", "string"),
           ("priority", "integer")),
)
def submit() -> Response:
    services().governor.check_budget(principal())  # a key whose token budget is spent queues nothing more
    fields = _submission()
    if query_flag("dry_run"):
        return _dry_run(fields)
    return json_response(services().jobs.submit(**fields, owner=creator(), quota=principal()), 202)


def _submission() -> dict[str, Any]:
    """The job a ``POST /api/jobs`` describes, from either form: a JSONL (or plain-text) upload with the job's
    fields as query parameters, or a JSON body.  Its items are validated lazily, as they are read."""
    if request.mimetype in STREAMED_TYPES:
        kind = request.args.get("kind", "generate")
        if request.mimetype == "text/plain" and kind != "generate":
            raise BadRequest("plain-text uploads are prompts: use kind=generate")
        lines = text_lines(request.stream) if request.mimetype == "text/plain" else read_jsonl(request.stream)
        metadata = query_json("metadata")
        return {
            "kind": kind, "model": request.args.get("model", ""), "options": parse_options(query_json("options")),
            "chunk_size": query_int("chunk_size", None), "metadata": metadata if isinstance(metadata, dict) else None,
            "items": validated(kind, lines), "webhook_url": request.args.get("webhook_url") or None,
            "cache": query_flag("cache"), "completion_window": request.args.get("completion_window") or None,
            "priority": query_int("priority", 0) or 0,
        }
    body: JobSubmission = parse(JobSubmission, decode_json(request.get_data()),
                                what="the body (a JSON object with kind, model and items)")
    return {
        "kind": body.kind, "model": body.model, "options": parse_options(body.options), "chunk_size": body.chunk_size,
        "metadata": body.metadata, "items": validated(body.kind, enumerate(body.items, start=1)),
        "webhook_url": body.webhook_url, "cache": body.cache, "completion_window": body.completion_window,
        "priority": body.priority,
    }


def _dry_run(fields: dict[str, Any]) -> Response:
    """``?dry_run=true``: the same job, validated line by line and counted; nothing stored or queued."""
    shared = services()
    kind, model, options = fields["kind"], fields["model"], fields["options"]

    def throughput(digest: str) -> tuple[float | None, int]:
        rates = [w.get("throughput", {}).get(digest) for w in shared.gateway.worker_states() if w["alive"]]
        measured = [float(r) for r in rates if r]
        return (sum(measured) or None), len(measured)

    # A dry run stores nothing but costs a worker's time and Redis, so it is a request of the key's like a sync
    # one: admitted against its request rate and open requests, and one request in its usage.  The prompt tokens
    # it counts are tokenized, not evaluated, so they are charged to neither the token windows nor usage (a dry
    # run before a job would spend the budget the job needs); CORRAL_DRY_RUN_MAX_TOKENS bounds them instead.
    ticket = shared.governor.admit(principal(), model)  # a 429 before any line is read
    try:
        answer = shared.jobs.dry_run(
            kind=kind, model=model, options=options, items=fields["items"], quota=principal(),
            count=lambda digest, bodies: shared.gateway.count_tokens(model, digest, kind, bodies, options or {}),
            throughput=throughput,
        )
        shared.governor.finish(ticket)
    finally:
        shared.governor.release(ticket)
    return json_response(answer)


@bp.get("/api/jobs")
@documented(response=R.JobList, query=(("status", "string"), ("limit", "integer"), ("offset", "integer")))
def list_jobs() -> Response:
    return json_response(
        services().jobs.list(
            status=request.args.get("status"), limit=query_int("limit", 20) or 20, offset=query_int("offset", 0) or 0,
            owner=owner(),
        )
    )


@bp.get("/api/jobs/<job_id>")
@documented(response=R.JobView)
def get_job(job_id: str) -> Response:
    return json_response(services().jobs.get(job_id, owner()))


@bp.get("/api/jobs/<job_id>/results")
@documented(stream=NDJSON, query=(("offset", "integer"), ("limit", "integer"), ("state", "string"), ("include_input", "string")))
def results(job_id: str) -> Response:
    lines = services().jobs.results(
        job_id, offset=query_int("offset", 0) or 0, limit=query_int("limit", None), state=request.args.get("state"),
        include_input=request.args.get("include_input", "").lower() in ("1", "true", "yes"), owner=owner(),
    )
    body = (dumps(line) + "\n" for line in lines)
    return Response(stream_with_context(body), mimetype=NDJSON_MIMETYPE)


@bp.get("/api/jobs/<job_id>/search")
@documented(response=R.SearchResults, query=(("q", "string"), ("k", "integer")))
def search(job_id: str) -> Response:
    """Embed ``q`` with the job's model, return the ``k`` most similar stored chunks (cosine)."""
    query = request.args.get("q", "")
    if not query.strip():
        raise BadRequest("q is required: the text to search for")
    k = query_int("k", 5) or 5
    if not 1 <= k <= 1000:
        raise BadRequest("k must be between 1 and 1000")
    return json_response(services().search_job(job_id, query, k, owner()))


@bp.post("/api/jobs/<job_id>/cancel")
@documented(response=R.JobView)
def cancel(job_id: str) -> Response:
    return json_response(services().jobs.cancel(job_id, owner()))


@bp.post("/api/jobs/<job_id>/retry")
@documented(response=R.JobView)
def retry(job_id: str) -> Response:
    return json_response(services().jobs.retry(job_id, owner()))


@bp.delete("/api/jobs/<job_id>")
@documented(response=R.Deleted)
def delete(job_id: str) -> Response:
    return json_response(services().jobs.delete(job_id, owner()))


@bp.get("/api/queue")
@documented(response=R.Queue)
def queue() -> Response:
    shared = services()
    queue = shared.queue(principal(), shared.gateway.workers())
    workers = [
        {"name": w["name"], "gpu": w.get("gpu"), "models": w["models"], "loaded": [m["name"] for m in w["loaded"]],
         **{k: w[k] for k in ("slots", "slots_busy", "tokens_per_second", "tokens_generated", "prompt_tokens_decoded") if k in w}}
        for w in queue["workers"]
    ]
    return json_response({"models": queue["models"], "workers": workers})


@bp.get("/api/usage")
@documented(summary="Requests, tokens, embedding inputs and batch items per API key and day.",
            query=(("key", "string"), ("since", "string")))
def usage() -> Response:
    """Usage per key and day (UTC): an admin key (or any caller when keys are off) sees every key, or the one
    named in ``key``; any other key sees itself only."""
    shared = services()
    shared.governor.flush()  # this process's latest counts first
    who = principal()
    key = request.args.get("key") or None
    if who is not None and not who.admin:
        key = who.key_id
    elif key is not None:
        key = next((r["id"] for r in shared.governor.keys.list() if key in (r["id"], r["name"])), key)
    since = request.args.get("since")
    try:
        first = date.fromisoformat(since) if since else None
    except ValueError as exc:
        raise BadRequest("since must be a date, YYYY-MM-DD") from exc
    return json_response({"usage": shared.governor.keys.usage(key, first)})
