"""Capabilities derived as Ollama derives them: from a Go template layer when there is one, else from the GGUF's
chat template, plus fill-in-the-middle tokens; vision with a projector layer."""

from __future__ import annotations

from corral.modelstore.capabilities import derive
from corral.modelstore.gotemplate import parse, thinking_tags

# Ollama's library template for Qwen3 (abridged): thinking inside the range over .Messages.
QWEN3 = (
    "{{- if .Tools }}<tools>{{ range .Tools }}{{ json . }}{{ end }}</tools>{{ end }}"
    "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
    "{{- if eq .Role \"assistant\" }}<|im_start|>assistant\n"
    "{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<|im_end|>\n"
    "{{- else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}"
)
CHAT = {"capabilities": ["completion"], "model_family": "llama", "model_info": {"general.architecture": "llama"}}


def with_info(**info: object) -> dict[str, object]:
    return {**CHAT, "model_info": {"general.architecture": "llama", **info}}


def test_thinking_tags_are_found_where_ollama_finds_them() -> None:
    assert thinking_tags(parse(QWEN3)) == ("<think>", "</think>")
    outside = "{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Prompt }}"  # not inside range .Messages
    assert thinking_tags(parse(outside)) == ("", "")
    assert derive(CHAT, QWEN3) == ["completion", "tools", "thinking"]
    assert derive(CHAT, outside) == ["completion"]


def test_a_template_layer_decides_over_the_gguf_template() -> None:
    config = with_info(**{"tokenizer.chat_template": "{% for tool in tools %}<think></think>{% endfor %}"})
    assert derive(config, None) == ["completion", "tools", "thinking"]
    assert derive(config, "{{ .Prompt }}") == ["completion"]
    assert derive(config, "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>") == ["completion", "insert"]


def test_fim_tokens_and_embedding() -> None:
    fim = with_info(**{"tokenizer.ggml.fim_pre_token_id": 1, "tokenizer.ggml.fim_suf_token_id": 2,
                       "tokenizer.ggml.fim_mid_token_id": 3})
    assert derive(fim, None) == ["completion", "insert"]
    # llama.cpp needs the projector file: vision keys in the model's own GGUF are not enough
    assert derive(with_info(**{"llama.vision.block_count": 24}), None) == ["completion"]
    assert derive(CHAT, None, projector=True) == ["completion", "vision"]
    assert derive({"capabilities": ["embedding"], "model_info": {"tokenizer.chat_template": "tools"}}, None) == ["embedding"]
