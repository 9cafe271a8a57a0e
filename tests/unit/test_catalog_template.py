"""The packaged smollm2 as Ollama's library ships it (#35 item 5): its Go TEMPLATE renders ChatML with the tools
listed in the system turn, the model has the ``tools`` capability, what it writes back is read as calls, and a
store an older corral made (the GGUF alone) gets the template at start-up, while an admin's own model under the
default's name keeps its layers."""

from __future__ import annotations

import json
from pathlib import Path

from corral.modelstore.catalog import SMOLLM2_TEMPLATE, packaged_smollm2, pull
from corral.modelstore.layers import render_template
from corral.modelstore.store import LAYER_MEDIA_PREFIX, ModelStore
from corral.toolcalls import split_tool_calls, tool_format
from tests.helpers import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_the_template_renders_chatml_with_the_tools_and_a_tool_round_trip(models_dir: Path) -> None:
    record = ModelStore(models_dir).get(MODEL)
    assert record.extras["template"] == [SMOLLM2_TEMPLATE]
    assert record.capabilities == ["completion", "tools"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"},
    ]
    kind, fields = render_template(record, "chat", {"messages": messages, "tools": [WEATHER]})
    assert kind == "generate" and fields["raw"] is True
    prompt = fields["prompt"]
    system, rest = prompt.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert f"<tools>\n{json.dumps(WEATHER, separators=(',', ':'))}\n</tools>" in system
    assert "<tool_call>" in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>[{"name": "get_weather", "arguments": {"city":"Paris"}}]</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    two = [{"function": {"name": "get_weather", "arguments": {"city": city}}} for city in ("Paris", "Oslo")]
    _, fields = render_template(record, "chat", {"messages": [messages[1], {"role": "assistant", "tool_calls": two}]})
    assert fields["prompt"].endswith('<tool_call>[{"name": "get_weather", "arguments": {"city":"Paris"}}, '
                                     '{"name": "get_weather", "arguments": {"city":"Oslo"}}]</tool_call>')


def test_without_tools_or_a_system_prompt_it_is_plain_chatml(models_dir: Path) -> None:
    record = ModelStore(models_dir).get(MODEL)
    _, chat = render_template(record, "chat", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["prompt"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # no default system prompt
    _, generate = render_template(record, "generate", {"system": "Be kind.", "prompt": "Hi"})
    assert generate["prompt"] == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
        "<|im_start|>assistant\n"


def test_what_the_model_is_asked_to_write_is_read_as_calls() -> None:
    family = tool_format(SMOLLM2_TEMPLATE)
    assert family == "hermes"
    for reply in ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                  'Let me look.\n<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'):
        text, calls = split_tool_calls(reply, {"get_weather"}, family)
        assert [c["function"]["name"] for c in calls] == ["get_weather"], reply
        assert calls[0]["function"]["arguments"] == {"city": "Paris"}
        assert "<tool_call>" not in text


def test_an_older_store_gets_the_template_and_an_admins_model_keeps_its_layers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    gguf = packaged_smollm2()
    assert gguf is not None
    store.register_gguf(["smollm2:135m", "smollm2:latest"], gguf, link=True)  # what an older corral wrote
    assert "template" not in store.get("smollm2:135m").extras
    statuses = [p["status"] for p in pull(store, "smollm2:135m", keep_own_layers=True)]
    assert statuses[-1] == "success"
    for name in ("smollm2:135m", "smollm2:latest"):
        assert store.get(name).extras["template"] == [SMOLLM2_TEMPLATE] and "tools" in store.get(name).capabilities
    before = store.manifest("smollm2:135m")
    list(pull(store, "smollm2:135m", keep_own_layers=True))  # nothing changed: the manifest stays as it was
    assert store.manifest("smollm2:135m") == before
    # An admin's model under the default's name (small layers of its own) keeps them at start-up; a pull by
    # hand replaces them with the library's, as `ollama pull` does.
    digest, size = store.write_blob_bytes(b"{{ .Prompt }}")
    own = {**before, "layers": [before["layers"][0],
                                {"mediaType": LAYER_MEDIA_PREFIX + "template", "digest": f"sha256:{digest}", "size": size}]}
    store.write_manifest("smollm2:latest", own)
    list(pull(store, "smollm2:135m", keep_own_layers=True))
    assert store.get("smollm2:latest").extras["template"] == ["{{ .Prompt }}"]
    list(pull(store, "smollm2:latest"))
    assert store.get("smollm2:latest").extras["template"] == [SMOLLM2_TEMPLATE]
