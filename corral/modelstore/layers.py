"""A model's small layers (Ollama's Modelfile: SYSTEM, PARAMETER, MESSAGE, LICENSE, TEMPLATE) as they are read
from its record and applied to a request.

The layers change behaviour, as in Ollama: ``system`` is the default system prompt (a request's own system
prompt wins), ``params`` the default options (a request's own options win; ``stop`` is a list), ``messages`` a
conversation put before every chat's messages, ``template`` the Go template a prompt is rendered with.  Every
request gets SYSTEM, PARAMETER and MESSAGE through the one request builder (corral/requests.py), and the worker
alone renders TEMPLATE (:func:`render_template`, from workers/execution.py), so a job line behaves as the same
body sent to the sync route.  ``/api/create`` writes them (:mod:`corral.modelstore.model_create`) and ``/api/show`` shows
them back as a Modelfile (:mod:`corral.modelstore.modelfile`).
"""

from __future__ import annotations

import json
from typing import Any

from corral.modelstore.gotemplate import RenderBudget, render, variables
from corral.modelstore.gotemplate import parse as parse_template
from corral.modelstore.store import ModelRecord


def system_of(record: ModelRecord) -> str | None:
    texts = record.extras.get("system")
    return texts[-1] if texts else None


def params_of(record: ModelRecord) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for text in record.extras.get("params", []):
        try:
            merged.update(json.loads(text))
        except (ValueError, TypeError):
            continue  # a layer this server cannot read changes nothing
    return merged


def messages_of(record: ModelRecord) -> list[dict[str, Any]]:
    for text in reversed(record.extras.get("messages", [])):
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, list):
            return [m for m in value if isinstance(m, dict)]
    return []


def licenses_of(record: ModelRecord) -> list[str]:
    return list(record.extras.get("license", []))


def template_of(record: ModelRecord) -> str | None:
    texts = record.extras.get("template")
    return texts[-1] if texts else None


def render_template(record: ModelRecord, kind: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A model with a TEMPLATE layer: the request as a raw prompt rendered with that template, as Ollama
    renders it (``.Messages``, ``.System``, ``.Tools``; or ``.Prompt`` and ``.Response`` for older templates).
    Returns (kind, fields) as the worker's prompt_for uses them (it fits a long chat itself, rendering fewer
    messages); other models keep their request (the GGUF's own template renders it)."""
    template = template_of(record)
    if template is None or kind not in ("generate", "chat") or fields.get("raw"):
        return kind, fields
    nodes = parse_template(template)
    if kind == "chat":
        messages = [dict(m) for m in fields.get("messages") or []]
    else:
        messages = ([{"role": "system", "content": fields["system"]}] if fields.get("system") else []) + [
            {"role": "user", "content": fields.get("prompt") or ""}]
    system = "\n\n".join(m.get("content", "") for m in messages if m.get("role") == "system")
    think = fields.get("think")
    values = {"System": system, "Messages": _collate(messages), "Tools": fields.get("tools") or [],
              "Prompt": "", "Response": "", "Suffix": fields.get("suffix") or "", "Think": bool(think),
              "ThinkLevel": think if isinstance(think, str) else "", "IsThinkSet": think is not None}
    if ".Messages" in template:
        prompt = render(nodes, values)
    else:  # an older template: one render per turn, Prompt and Response
        prompt, pending, budget = "", "", RenderBudget()  # one budget for all the turns
        for message in messages:
            role, content = message.get("role"), str(message.get("content", ""))
            if role == "user":
                pending = content
            elif role == "assistant":
                prompt += render(nodes, {**values, "Prompt": pending, "Response": content}, budget)
                pending = ""
        prompt += render(nodes, {**values, "Prompt": pending}, budget)
    placed = ("suffix",) if "suffix" in variables(nodes) else ()  # else the worker uses the GGUF's FIM tokens
    out = {k: v for k, v in fields.items() if k not in ("messages", "system", "context", *placed)}
    return "generate", {**out, "prompt": prompt, "raw": True}


def _collate(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive messages of one role merged, as Ollama does before it renders a template."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and out[-1].get("role") == message.get("role") and not message.get("tool_calls"):
            out[-1] = {**out[-1], "content": f"{out[-1].get('content', '')}\n\n{message.get('content', '')}"}
        else:
            out.append(dict(message))
    return out


def apply_layers(record: ModelRecord, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A generate or chat request's fields with the model's defaults under them (the request's own win)."""
    if kind not in ("generate", "chat") or not record.extras:
        return fields
    out = dict(fields)
    params = params_of(record)
    if params:
        out["options"] = {**params, **(fields.get("options") or {})}
    system = system_of(record)
    if kind == "generate":
        if system and not fields.get("system") and not fields.get("raw"):
            out["system"] = system
    else:
        messages = list(fields.get("messages") or [])
        if system and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        prefix = messages_of(record)
        if prefix:
            at = 1 if messages and messages[0].get("role") == "system" else 0
            messages = [*messages[:at], *prefix, *messages[at:]]
        out["messages"] = messages
    return out
