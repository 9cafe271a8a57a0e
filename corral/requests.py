"""The one request builder: a parsed request plus the model's layers, turned into what a worker runs.

The sync routes (api/inference.py), job items and OpenAI batch lines (workers/items.py) and the dry run (which
counts items through workers/items.py) all build their :class:`~corral.protocol.InferenceRequest` here, in one
order:

1. thinking: ``think`` checked against the model, and the tags its reply's thinking comes between;
2. images: ``[img-N]`` tags put in the text (corral/images.py), before any template sees it;
3. the model's SYSTEM, PARAMETER and MESSAGE layers (corral/modelstore/layers.py), under the request's own values;
4. the server's ``num_predict`` cap (``CORRAL_MAX_PREDICT``), for the sync routes.

The request keeps its messages.  A model's TEMPLATE layer is rendered in one place, by the worker, when it
builds the prompt (workers/execution.py ``prompt_for``): it needs the tokenizer to fit a long chat into
``num_ctx``, and rendering there once is rendering it once.  So a job line and the same body sent to the sync
route make the same request, and the same prompt (tests/unit/test_requests.py).
"""

from __future__ import annotations

from typing import Any

from corral.images import tag_request
from corral.modelstore.capabilities import thinking_fields
from corral.modelstore.layers import apply_layers
from corral.modelstore.store import ModelRecord
from corral.protocol import InferenceRequest, new_request_id


def build_request(record: ModelRecord, name: str, kind: str, *, max_predict: int = 0, **fields: Any) -> InferenceRequest:
    """The request for ``kind`` (generate, chat, embed, rerank, load) on ``record``, which the client called ``name``;
    ``fields`` are the request's own (``think``, ``messages``, ``options``, ...)."""
    fields.update(thinking_fields(record, kind, fields.pop("think", None), raw=bool(fields.get("raw"))))
    fields = tag_request(kind, fields)
    fields = apply_layers(record, kind, fields)
    if max_predict and kind in ("generate", "chat"):
        options = dict(fields.get("options") or {})
        wanted = options.get("num_predict")
        if not isinstance(wanted, int) or wanted < 0 or wanted > max_predict:
            options["num_predict"] = max_predict  # CORRAL_MAX_PREDICT: no sync request generates more
        fields["options"] = options
    return InferenceRequest(request_id=new_request_id(), kind=kind, model=name, model_digest=record.model_digest,
                            **fields)


def item_fields(options: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """A generate or chat job item's stored body as request fields, the job's ``options`` under the item's own."""
    return {
        "prompt": body.get("prompt"), "system": body.get("system"), "raw": bool(body.get("raw", False)),
        "context": body.get("context"), "messages": body.get("messages"), "tools": body.get("tools") or None,
        "images": body.get("images") or None, "options": {**options, **(body.get("options") or {})},
        "format": body.get("format"), "think": body.get("think"),
        "logprobs": bool(body.get("logprobs")), "top_logprobs": int(body.get("top_logprobs") or 0),
    }
