"""Ollama's native routes (``/``, ``/api/*``), wire-compatible with the reference.

Views parse the body into a schema, call a service (inference; pull, show and create in :mod:`api.models_admin`)
or the model store, and serialise.  Error texts and statuses are Ollama's own, including its inconsistencies
(``model 'x' not found`` on generate, ``model "x" not found, try pulling it first`` on embed) because clients
match on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, send_file

from api.auth import principal, refuse_if_read_only, require_admin
from api.errors import json_response
from api.inference import EMBED_NOT_FOUND, Inference, collect, load_reply
from api.openapi import NDJSON, documented
from api.services import services
from api.streaming import ndjson, prime
from corral import OLLAMA_COMPAT_VERSION
from corral.errors import BadRequest, ModelNotFound
from corral.modelstore.store import ModelName, ModelRecord
from corral.timefmt import rfc3339
from corral.wire import responses as R
from corral.wire.ollama import (
    ChatRequest,
    CopyRequest,
    CreateRequest,
    DeleteRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    PullRequest,
    ShowRequest,
    check_context,
    parse_body,
)

bp = Blueprint("ollama", __name__)


@bp.route("/", methods=["GET", "HEAD"])
@documented(summary="Liveness: `Ollama is running`.", media="text/plain")
def root() -> Response:
    return Response("Ollama is running", mimetype="text/plain; charset=utf-8")


@bp.route("/api/version", methods=["GET", "HEAD"])
@documented(response=R.Version)
def version() -> Response:
    return json_response({"version": OLLAMA_COMPAT_VERSION})


@bp.post("/api/generate")
@documented(body=GenerateRequest, response=R.GenerateChunk, stream=NDJSON, stream_item=R.GenerateChunk)
def generate() -> Response:
    req = parse_body(GenerateRequest, request.get_data())
    if not req.model:
        raise ModelNotFound("model '' not found")
    svc = services().inference
    record = svc.model(req.model)  # a missing model's 404 comes before the raw-mode 400, as in Ollama
    if req.raw and (req.template or req.system or req.context):
        raise BadRequest("raw mode does not support template, system, or context")
    svc.check_generation(record, req.model, "generate", think=req.think, images=bool(req.images))
    check_context(req.context, int(record.config.get("vocab_size") or 0))
    if req.suffix and "insert" not in record.capabilities:
        raise BadRequest(f"{ModelName.parse(req.model).display} does not support insert")
    if not req.prompt:
        return _load_or_unload(svc, record, req.model, req.keep_alive, "generate", req.options)
    job = svc.request(
        record, req.model, "generate", prompt=req.prompt, suffix=req.suffix or None, system=req.system, raw=req.raw,
        context=req.context, images=req.images or None,
        options=req.options, format=req.format, keep_alive=req.keep_alive, think=req.think,
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
        truncate=req.truncate is not False, shift=req.shift is not False,
    )
    chunks = svc.generation(job, "generate")
    if not req.streaming:
        return json_response(collect(chunks, "generate"))
    return ndjson(prime(chunks), chunks)


@bp.post("/api/chat")
@documented(body=ChatRequest, response=R.ChatChunk, stream=NDJSON, stream_item=R.ChatChunk)
def chat() -> Response:
    req = parse_body(ChatRequest, request.get_data())
    if not req.model:
        raise BadRequest("model is required")
    svc = services().inference
    record = svc.generation_model(req.model, "chat", think=req.think, tools=bool(req.tools),
                                  images=any(m.images for m in req.messages or []))
    if not req.messages:
        return _load_or_unload(svc, record, req.model, req.keep_alive, "chat", req.options)
    job = svc.request(
        record, req.model, "chat", messages=[m.for_template() for m in req.messages], tools=req.tools or None,
        options=req.options, format=req.format, keep_alive=req.keep_alive, think=req.think,
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
        truncate=req.truncate is not False, shift=req.shift is not False,
    )
    chunks = svc.generation(job, "chat")
    if not req.streaming:
        return json_response(collect(chunks, "chat"))
    return ndjson(prime(chunks), chunks)


def _load_or_unload(
    svc: Inference, record: ModelRecord, name: str, keep_alive: float | None, shape: Any, options: dict[str, Any]
) -> Response:
    return json_response(load_reply(name, shape, svc.load_or_unload(record, name, keep_alive, options)))


@bp.post("/api/embed")
@documented(body=EmbedRequest, response=R.Embed)
def embed() -> Response:
    req = parse_body(EmbedRequest, request.get_data())
    if not req.model:
        raise ModelNotFound("model '' not found")
    svc = services().inference
    record = svc.model(req.model, not_found=EMBED_NOT_FOUND)
    if not req.inputs:
        svc.load_or_unload(record, req.model, req.keep_alive, req.options)
        return json_response({"model": req.model, "embeddings": []})
    job = svc.request(
        record, req.model, "embed", inputs=req.inputs, truncate=req.truncate, dimensions=req.dimensions,
        options=req.options, keep_alive=req.keep_alive,
    )
    data, timing = svc.single(job)
    return json_response(
        {"model": req.model, "embeddings": data["embeddings"], **timing, "prompt_eval_count": data["prompt_eval_count"]}
    )


@bp.post("/api/embeddings")
@documented(body=EmbeddingsRequest, response=R.Embeddings)
def embeddings() -> Response:
    req = parse_body(EmbeddingsRequest, request.get_data())
    if not req.model:
        raise BadRequest("model is required")
    svc = services().inference
    record = svc.model(req.model, not_found=EMBED_NOT_FOUND)
    if not req.prompt:
        svc.load_or_unload(record, req.model, req.keep_alive, req.options)
        return json_response({"embedding": []})
    job = svc.request(
        record, req.model, "embed", inputs=[req.prompt], normalize=False, options=req.options,
        keep_alive=req.keep_alive,
    )
    data, _ = svc.single(job)
    return json_response({"embedding": data["embeddings"][0]})


def _list_entry(record: ModelRecord) -> dict[str, Any]:
    name = record.name.display
    return {
        "name": name,
        "model": name,
        "modified_at": rfc3339(record.modified_at),
        "size": record.size,
        "digest": record.digest,
        "details": record.details(),
        "capabilities": record.capabilities,
    }


@bp.route("/api/tags", methods=["GET", "HEAD"])
@documented(response=R.Tags)
def tags() -> Response:
    shared = services()
    allowed = [r for r in shared.store.list() if shared.governor.allowed(principal(), r.name.display)]
    return json_response({"models": [_list_entry(r) for r in allowed]})


@bp.post("/api/show")
@documented(body=ShowRequest, response=R.Show)
def show() -> Response:
    req = parse_body(ShowRequest, request.get_data())
    if not req.target:
        raise BadRequest("model is required")
    return json_response(services().models.show(req.target, verbose=req.verbose))


@bp.get("/api/ps")
@documented(response=R.Running)
def ps() -> Response:
    shared = services()
    models = [m for m in shared.inference.gateway.loaded() if shared.governor.allowed(principal(), m["name"])]
    models.sort(key=lambda m: m["expires_at"], reverse=True)
    return json_response({"models": models})


@bp.delete("/api/delete")
@documented(body=DeleteRequest)
def delete() -> Response:
    req = parse_body(DeleteRequest, request.get_data())
    refuse_if_read_only("deleting a model")
    require_admin("deleting a model")
    if not req.target:
        raise BadRequest("model is required")
    try:
        ModelName.parse(req.target)
    except BadRequest as exc:
        raise BadRequest(f'name "{req.target}" is invalid') from exc
    services().inference.store.delete(req.target)
    return Response(status=200)


@bp.post("/api/copy")
@documented(body=CopyRequest)
def copy() -> Response:
    req = parse_body(CopyRequest, request.get_data())
    refuse_if_read_only("copying a model")
    require_admin("copying a model")
    for label, value in (("source", req.source), ("destination", req.destination)):
        try:
            ModelName.parse(value)
        except BadRequest as exc:
            raise BadRequest(f'{label} "{value}" is invalid') from exc
    services().inference.store.copy(req.source, req.destination)
    return Response(status=200)


@bp.post("/api/pull")
@documented(body=PullRequest, response=R.Progress, stream=NDJSON, stream_item=R.Progress)
def pull() -> Response:
    """Fetch a model from its registry (Ollama's, another host, or hf.co), or build one of the two default models
    from its installed package (no network), with Ollama's progress lines."""
    req = parse_body(PullRequest, request.get_data())
    refuse_if_read_only("pulling a model")
    require_admin("pulling a model")
    if not req.target:
        raise BadRequest("model is required")
    return _progress(services().models.pull(req.target, insecure=req.insecure), req.stream)


def _progress(steps: Iterator[dict[str, Any]], stream: bool | None) -> Response:
    """Ollama's progress replies (pull, create): NDJSON status lines, or with ``stream: false`` the last one.
    The first step runs before the reply starts, so a failure there is its own HTTP status."""
    first = prime(steps)
    if stream is False:
        last = first
        for step in steps:
            last = step
        return json_response(last)
    return ndjson(first, steps)


@bp.post("/api/blobs/<digest>")
@documented(upload="application/octet-stream", summary="Upload a blob (a GGUF for /api/create), checked against its digest.")
def upload_blob(digest: str) -> Response:
    """Stream the body into the store a MiB at a time (a multi-GB GGUF never sits in memory), check it against
    ``digest`` before it becomes visible: 201 created, 200 when the store had it, 400 on a mismatch."""
    refuse_if_read_only("uploading a model file")
    require_admin("uploading a model file")
    store = services().inference.store
    if store.has_blob(digest):
        request.stream.read()  # drain what the client sends, then answer
        return Response(status=200)
    stream = request.stream
    store.write_blob_stream(digest, iter(lambda: stream.read(1 << 20), b""))
    return Response(status=201)


@bp.post("/api/create")
@documented(body=CreateRequest, response=R.Progress, stream=NDJSON, stream_item=R.Progress)
def create() -> Response:
    """Create a model from a GGUF blob or an existing model, with its layers (SYSTEM, PARAMETER, MESSAGE, LICENSE,
    TEMPLATE, ADAPTER), quantized when asked; a worker loads new files with llama.cpp before anything is written."""
    req = parse_body(CreateRequest, request.get_data())
    refuse_if_read_only("creating a model")
    require_admin("creating a model")
    if not req.target:
        raise BadRequest("model is required")
    steps = services().models.create(
        req.target, base=req.from_, files=req.files, system=req.system, parameters=req.parameters,
        messages=req.messages, license=req.license, template=req.template, adapters=req.adapters,
        quantize=req.quantize,
    )
    return _progress(steps, req.stream)


@bp.route("/api/blobs/<digest>", methods=["GET", "HEAD"])
@documented(media="application/octet-stream")
def blob(digest: str) -> Response:
    """HEAD: does the store have this blob (Ollama's 200/404).  GET (corral): stream it, so a worker on another
    machine can pull a model by digest and check it against its sha256.  With keys required, a key reads only
    the blobs of models its allow-list lets it use (:meth:`Governor.check_blob`)."""
    shared = services()
    store = shared.inference.store
    shared.governor.check_blob(principal(), store, digest)
    path = store.blob_path(digest)
    if not path.is_file():
        return Response(status=404) if request.method == "HEAD" else json_response({"error": "blob not found"}, 404)
    digest_header = {"Docker-Content-Digest": "sha256:" + path.name.split("-", 1)[1]}
    if request.method == "HEAD":  # the answer without opening the file
        return Response(status=200, mimetype="application/octet-stream",
                        headers={**digest_header, "Content-Length": str(path.stat().st_size)})
    resp = send_file(path, mimetype="application/octet-stream", conditional=True, max_age=0)
    resp.headers.update(digest_header)
    return resp


@bp.get("/api/manifests/<path:name>")
@documented(summary="The manifest behind a model name.")
def manifest(name: str) -> Response:
    """The manifest behind a model name (corral): which blobs a remote worker needs to serve it.  Covered by the
    key's allow-list, as /api/show is: the manifest names the model's every blob."""
    shared = services()
    shared.governor.check_model(principal(), name)  # first: a limited key learns nothing of what exists
    return json_response(shared.inference.store.manifest(name))
