"""A model's capabilities, derived as Ollama derives them (``server/images.go``), from what the store holds.

- ``embedding`` for a model with a pooling type (an encoder), else ``completion``; only a completion model has
  the others.  ``rerank`` (corral's; Ollama has no rerank) instead of ``embedding`` for a cross-encoder: rank
  pooling, or an encoder with a classifier head (corral/modelstore/gguf_meta.py ``is_reranker``).
- With a ``TEMPLATE`` layer (Ollama's Go template), that template decides: ``tools`` when it reads ``.Tools``,
  ``insert`` when it reads ``.Suffix``, ``thinking`` when it puts tags around ``.Thinking`` inside its range over
  ``.Messages`` (Ollama's ``thinking.InferTags``).
- Without one, the GGUF's own chat template decides, by the same substring tests as Ollama's
  ``chatTemplateCapabilities``: ``tools`` when it mentions ``tools`` or ``tool_call``, ``thinking`` when it has
  ``<think>`` and ``</think>`` (or splits a reply at ``</think>``).
- ``insert`` also when the GGUF names its fill-in-the-middle tokens (llama.cpp's ``tokenizer.ggml.fim_*``), since
  corral builds the FIM prompt from them.
- ``vision`` for a model with a projector layer (Ollama's ``projectorCapabilities``), whose images llama.cpp's
  mtmd library encodes (workers/media.py).  Not for a GGUF that merely has ``vision.*`` keys (Ollama's own engine
  serves those; llama.cpp needs the projector file), so a request with images to any other model is a 400
  rather than an answer about an image the model never saw.

Derived when asked rather than stored, so a store written by an older corral or by Ollama gets the same answer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from corral.modelstore.gotemplate import TemplateError, parse, thinking_tags, variables
from corral.thinking import DEFAULT_TAGS

FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")


@lru_cache(maxsize=256)
def _go_template(template: str) -> tuple[frozenset[str], tuple[str, str]]:
    """(fields read, thinking tags) of a Go template, parsed once; a template that does not parse has neither."""
    try:
        nodes = parse(template)
    except TemplateError:
        return frozenset(), ("", "")
    return frozenset(variables(nodes)), thinking_tags(nodes)


def chat_template_thinks(chat_template: str) -> bool:
    if "<think>" in chat_template and "</think>" in chat_template:
        return True
    return ("content.split('</think>')" in chat_template or 'content.split("</think>")' in chat_template) and \
        "reasoning_content" not in chat_template


def has_fim_tokens(model_info: dict[str, Any]) -> bool:
    return all(model_info.get(key) is not None for key in FIM_KEYS)


def derive(config: dict[str, Any], template: str | None, *, projector: bool = False) -> list[str]:
    """The capabilities of a model with this config blob (corral's, with ``model_info``), Go ``template`` layer
    (None without one) and, or not, a projector layer."""
    stored = config.get("capabilities") or []
    if "rerank" in stored:
        return ["rerank"]
    if "embedding" in stored:
        return ["embedding"]
    info: dict[str, Any] = config.get("model_info") or {}
    found = ["completion"]
    if template is not None:
        fields, (opening, closing) = _go_template(template)
        tools, insert, thinks = "tools" in fields, "suffix" in fields, bool(opening and closing)
    else:
        chat = str(info.get("tokenizer.chat_template") or "")
        tools, thinks, insert = "tools" in chat or "tool_call" in chat, chat_template_thinks(chat), False
    for name, present in (("tools", tools), ("thinking", thinks), ("insert", insert or has_fim_tokens(info)),
                          ("vision", projector)):
        if present:
            found.append(name)
    return found


def kind_refusal(capabilities: list[str], model: str, kind: str) -> str | None:
    """Why a model with these capabilities cannot run requests of ``kind`` (a job's or a batch's), or None:
    generate and chat need ``completion``, rerank needs ``rerank``; any other model embeds (a chat model's
    hidden states mean-pooled, as Ollama embeds with one), a reranker does not (its rank head is its output)."""
    if kind in ("embed", "index") and "rerank" in capabilities:
        return f'"{model}" does not support embeddings: it is a reranker (use /v1/rerank or a rerank job)'
    if kind == "rerank" and "rerank" not in capabilities:
        return f'"{model}" does not support rerank: it is not a cross-encoder with a classifier head'
    if kind in ("generate", "chat") and "completion" not in capabilities:
        return f'"{model}" does not support {kind}'
    return None


def thinking_tags_for(config: dict[str, Any], template: str | None) -> tuple[str, str]:
    """The tags around a thinking model's reasoning: its template's (Ollama's ``InferTags``), else ``<think>``."""
    if template is not None:
        opening, closing = _go_template(template)[1]
        if opening and closing:
            return opening, closing
    return DEFAULT_TAGS


def thinking_fields(record: Any, kind: str, think: bool | str | None, *, raw: bool = False) -> dict[str, Any]:
    """The ``think`` and ``think_tags`` a generate or chat request runs with (sync or a job item): a thinking
    model thinks unless told not to (Ollama >= 0.12.4); other models get neither (``think: true`` for them is a
    400 at the door)."""
    if kind not in ("generate", "chat") or raw or "thinking" not in record.capabilities:
        return {}
    template = record.extras.get("template")
    tags = thinking_tags_for(record.config, template[-1] if template else None)
    return {"think": True if think is None else think, "think_tags": list(tags)}
