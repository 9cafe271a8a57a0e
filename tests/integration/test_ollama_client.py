"""The official `ollama` Python client, unchanged, pointed at corral."""

from __future__ import annotations

import ollama
import pytest

from tests.helpers import MODEL


@pytest.fixture()
def oc(base_url: str) -> ollama.Client:
    return ollama.Client(host=base_url)


def test_chat_generate_embed(oc: ollama.Client) -> None:
    # Greedy: a sampled reply to "Hello" may end before 6 tokens (SmolLM2's TEMPLATE adds no system prompt).
    greedy = {"num_predict": 6, "temperature": 0}
    reply = oc.chat(model=MODEL, messages=[{"role": "user", "content": "Hello"}], options=greedy)
    assert reply.message.role == "assistant" and reply.message.content
    assert reply.done and reply.eval_count == 6
    parts = list(oc.generate(model=MODEL, prompt="Hello", stream=True, options=greedy))
    assert parts[-1].done and "".join(p.response for p in parts)
    emb = oc.embed(model=MODEL, input=["a", "b", "c"])
    assert len(emb.embeddings) == 3


def test_list_show_ps(oc: ollama.Client) -> None:
    names = [m.model for m in oc.list().models]
    assert "smollm2:135m" in names
    shown = oc.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.details.family == "llama"
    oc.generate(model=MODEL, prompt="", keep_alive="5m")
    assert MODEL + ":latest" in [m.model for m in oc.ps().models]


def test_unknown_model_raises_404_response_error(oc: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        oc.chat(model="does-not-exist", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.error == "model 'does-not-exist' not found"
