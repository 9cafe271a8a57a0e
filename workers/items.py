"""A batch item as the worker runs it: its request (the model's layers and template applied, as the sync route
applies them), and a dry run's token count of a list of items, rendered exactly as a run renders them."""

from __future__ import annotations

import logging
from typing import Any

from corral.capabilities import thinking_fields
from corral.images import tag_request
from corral.layers import apply_layers, render_template
from corral.protocol import BuildRequest, InferenceRequest, new_request_id
from corral.store import ModelRecord
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def item_request(record: ModelRecord, kind: str, name: str, digest: str, options: dict[str, Any],
                 body: dict[str, Any]) -> InferenceRequest:
    """The request a generate or chat item makes (job ``options`` under the item's own)."""
    raw = bool(body.get("raw", False))
    fields = apply_layers(record, kind, {
        "prompt": body.get("prompt"), "system": body.get("system"), "raw": raw,
        "context": body.get("context"), "messages": body.get("messages"), "tools": body.get("tools") or None,
        "images": body.get("images") or None,
        "options": {**options, **(body.get("options") or {})}, "format": body.get("format"),
        **thinking_fields(record, kind, body.get("think"), raw=raw),
        "logprobs": bool(body.get("logprobs")), "top_logprobs": int(body.get("top_logprobs") or 0),
    })
    fields = tag_request(kind, fields)  # images: [img-N] tags in the text, as the sync routes tag them
    request_kind, fields = render_template(record, kind, fields)  # a TEMPLATE layer: a raw prompt
    return InferenceRequest(request_id=new_request_id(), kind=request_kind, model=name, model_digest=digest, **fields)


def count_tokens(runtime: WorkerRuntime, req: BuildRequest) -> list[int | None]:
    """Prompt tokens of each item of ``req`` (a dry run's batch), None for an item that would fail to render."""
    record = runtime.requests.record_for(req.model, req.model_digest)
    embedding = req.kind == "embed"
    spec = runtime.requests.load_spec(record, req.options, embedding=embedding)
    counts: list[int | None] = []
    with runtime.registry.use(spec, record, req.model, runtime.settings.keep_alive) as (model, _):
        for body in req.items:
            try:
                if embedding:
                    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    counts.append(sum(len(t) for t in model.embed_tokens(inputs, truncate=bool(body.get("truncate", True)))))
                else:
                    request = item_request(record, req.kind, req.model, req.model_digest, req.options, body)
                    prompt, _, _, media = runtime.requests.prompt_for(model, request, record)
                    counts.append(len(prompt))
                    if media is not None:
                        media.close()
            except Exception:  # CorralError or not, this item would fail: counted as failing, never the dry run
                log.debug("item does not render", exc_info=True)
                counts.append(None)
    return counts
