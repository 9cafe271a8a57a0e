"""A batch item as the worker runs it: its request (built by the sync routes' builder, corral/requests.py),
and a dry run's token count of a list of items, rendered exactly as a run renders them."""

from __future__ import annotations

import logging
from typing import Any

from corral.modelstore.store import ModelRecord
from corral.protocol import BuildRequest, InferenceRequest
from corral.requests import build_request, item_fields
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def item_request(record: ModelRecord, kind: str, name: str, options: dict[str, Any], body: dict[str, Any]) -> InferenceRequest:
    """The request a generate or chat item makes, built as the sync route builds it (corral/requests.py)."""
    return build_request(record, name, kind, **item_fields(options, body))


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
                    request = item_request(record, req.kind, req.model, req.options, body)
                    prompt, _, _, media = runtime.requests.prompt_for(model, request, record)
                    counts.append(len(prompt))
                    if media is not None:
                        media.close()
            except Exception:  # CorralError or not, this item would fail: counted as failing, never the dry run
                log.debug("item does not render", exc_info=True)
                counts.append(None)
    return counts
