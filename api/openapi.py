"""``GET /openapi.json``: an OpenAPI 3.1 document generated from the routes and their pydantic schemas.

Nothing here is written by hand per route: the paths and methods come from Flask's URL map, and each view
names its request and response models with :func:`documented` (the same pydantic classes that parse the
requests; the response models in :mod:`corral.wire.responses`).  A route that declares nothing still appears,
with its path parameters and the error shape of its family, so the document covers every route.  The test
suite runs schemathesis against a live server from this document (tests/integration/test_openapi.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app
from pydantic import BaseModel

from api.errors import LLAMA_SERVER_PATHS, json_response
from corral import __version__
from corral.wire.responses import AnthropicError, CohereError, OllamaError, OpenAIError

bp = Blueprint("openapi", __name__)
F = TypeVar("F", bound=Callable[..., Any])
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


@dataclass(frozen=True)
class Doc:
    """What a view declares about itself."""

    summary: str = ""
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    stream: str | None = None  # NDJSON or SSE: the response may also be a stream of `stream_item`
    stream_item: type[BaseModel] | None = None
    query: tuple[tuple[str, str], ...] = ()  # (name, JSON type)
    upload: str | None = None  # "multipart" (OpenAI files) or NDJSON (job uploads) besides JSON
    media: str | None = None  # a non-JSON success body (text/plain, application/octet-stream)


def documented(**fields: Any) -> Callable[[F], F]:
    """Attach a :class:`Doc` to a view function."""

    def mark(view: F) -> F:
        view.openapi = Doc(**fields)  # type: ignore[attr-defined]
        return view

    return mark


class _Builder:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], mode: str) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
        for name, sub in schema.pop("$defs", {}).items():
            self.components.setdefault(name, sub)
        hook = getattr(model, "openapi_schema", None)  # a model that refers to others by name in its schema
        if hook is not None:
            schema = hook(schema, lambda other: self.ref(other, mode))
        self.components.setdefault(model.__name__, schema)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def operation(self, rule: Any, method: str, doc: Doc) -> dict[str, Any]:
        openai = rule.rule.startswith("/v1/")
        family = (AnthropicError if rule.rule.startswith("/v1/messages")
                  else OpenAIError if openai or rule.rule in LLAMA_SERVER_PATHS
                  else CohereError if rule.rule.startswith("/v2/") else OllamaError)
        error = self.ref(family, "serialization")
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in sorted(rule.arguments)
        ] + [{"name": name, "in": "query", "required": False, "schema": {"type": kind}} for name, kind in doc.query]
        op: dict[str, Any] = {
            "operationId": f"{method.lower()}_{rule.endpoint.replace('.', '_')}",
            "summary": doc.summary
            or (current_app.view_functions[rule.endpoint].__doc__ or "").strip().split("\n")[0]
            or f"{method} {rule.rule}",
            "tags": ["openai" if openai else rule.endpoint.split(".")[0]],
            "responses": {"default": {"description": "error", "content": {"application/json": {"schema": error}}}},
        }
        if params:
            op["parameters"] = params
        if doc.body is not None:
            content: dict[str, Any] = {"application/json": {"schema": self.ref(doc.body, "validation")}}
            if doc.upload == NDJSON:
                content[NDJSON] = {"schema": {"type": "string"}}
            if doc.upload == "multipart":
                content = {"multipart/form-data": {"schema": self.ref(doc.body, "validation")}}
            op["requestBody"] = {"required": True, "content": content}
        ok: dict[str, Any] = {}
        if doc.response is not None:
            ok["application/json"] = {"schema": self.ref(doc.response, "serialization")}
        if doc.stream is not None:
            item = self.ref(doc.stream_item, "serialization") if doc.stream_item else {}
            # An SSE body: its text, or (as schemathesis reads a stream) each event as {event, data, id}
            sse = {"schema": {"type": ["string", "object"]}}
            ok[doc.stream] = {"schema": item} if doc.stream == NDJSON else sse
        if doc.media is not None:
            ok[doc.media] = {"schema": {"type": "string"}}
        op["responses"][str(doc.status)] = {"description": "success", **({"content": ok} if ok else {})}
        return op


def build(app: Flask) -> dict[str, Any]:
    """The document for every route of ``app`` (HEAD and OPTIONS are implied by GET and CORS)."""
    builder = _Builder()
    paths: dict[str, Any] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        doc = getattr(app.view_functions[rule.endpoint], "openapi", Doc())
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = builder.operation(rule, method, doc)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "corral",
            "version": __version__,
            "description": "Ollama-compatible and OpenAI-compatible LLM serving with durable batch jobs.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(builder.components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }


@bp.get("/openapi.json")
@documented(summary="This OpenAPI document.")
def openapi() -> Response:
    document = current_app.extensions.get("corral_openapi")
    if document is None:
        document = current_app.extensions["corral_openapi"] = build(current_app)
    return json_response(document)
