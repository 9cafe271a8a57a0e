"""The one request builder (corral/requests.py): the same chat, sent to the sync route or as a job line, makes the
same request and the same prompt, with the model's layers applied in one order."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from corral.modelstore.layers import render_template
from corral.modelstore.store import ModelRecord, ModelStore
from corral.protocol import InferenceRequest
from corral.requests import build_request, item_fields
from tests.helpers import CHATML_TEMPLATE, MODEL


def house_model(models_dir: Path) -> ModelRecord:
    """SmolLM2 with SYSTEM, PARAMETER, MESSAGE and TEMPLATE layers, as `ollama create` writes them."""
    record = ModelStore(models_dir).get(MODEL)
    return dataclasses.replace(record, extras={
        "system": ["You answer in French."], "params": ['{"temperature": 0.2, "stop": ["###"]}'],
        "messages": ['[{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Salut !"}]'],
        "template": [CHATML_TEMPLATE]})


def same(a: InferenceRequest, b: InferenceRequest) -> dict[str, Any]:
    one, two = (r.model_dump(exclude={"request_id", "enqueued_at"}) for r in (a, b))
    assert one == two
    return one


def test_a_chat_makes_the_same_request_and_prompt_sync_and_as_a_job_line(models_dir: Path) -> None:
    record = house_model(models_dir)
    messages = [{"role": "user", "content": "Name a colour."}]
    options = {"num_predict": 8}
    sync = build_request(record, MODEL, "chat", messages=messages, options=options, think=None, tools=None,
                         format=None, logprobs=False, top_logprobs=0)
    job = build_request(record, MODEL, "chat", **item_fields({}, {"messages": messages, "options": options}))
    request = same(sync, job)
    assert request["options"] == {"temperature": 0.2, "stop": ["###"], "num_predict": 8}  # the layer's, then the request's
    assert [m["content"] for m in request["messages"]] == ["You answer in French.", "Bonjour", "Salut !", "Name a colour."]
    prompts = [render_template(record, "chat", {"messages": r.messages, "tools": r.tools, "think": r.think})[1]["prompt"]
               for r in (sync, job)]
    assert prompts[0] == prompts[1] and prompts[0].startswith("<|im_start|>system\nYou answer in French.<|im_end|>")


def test_a_job_options_go_under_the_items_own_and_the_sync_cap_only_on_sync_routes(models_dir: Path) -> None:
    record = ModelStore(models_dir).get(MODEL)
    job = build_request(record, MODEL, "generate", **item_fields({"num_predict": 100, "seed": 1},
                                                                 {"prompt": "x", "options": {"num_predict": 5}}))
    assert job.options == {"num_predict": 5, "seed": 1}
    sync = build_request(record, MODEL, "generate", max_predict=64, prompt="x", options={"num_predict": -1})
    assert sync.options["num_predict"] == 64
