"""Ollama's response objects, built in one place for the API's streams and the batch results alike."""

from __future__ import annotations

from typing import Any

from corral.timefmt import utc_now

METRICS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration")


def ollama_chunk(model: str, shape: str, text: str, *, done: bool) -> dict[str, Any]:
    """An intermediate chunk of /api/generate (``response``) or /api/chat (``message``)."""
    chunk: dict[str, Any] = {"model": model, "created_at": utc_now()}
    if shape == "chat":
        chunk["message"] = {"role": "assistant", "content": text}
    else:
        chunk["response"] = text
    chunk["done"] = done
    return chunk


def ollama_final(model: str, shape: str, stats: dict[str, Any], text: str = "") -> dict[str, Any]:
    """The final chunk (``text`` empty) or the whole non-stream reply (``text`` = everything generated)."""
    chunk = ollama_chunk(model, shape, text, done=True)
    reason = stats.get("done_reason")
    if reason and reason != "cancelled":
        chunk["done_reason"] = reason
    if shape == "generate" and stats.get("context"):
        chunk["context"] = stats["context"]
    for key in METRICS:
        if stats.get(key):  # Go's omitempty: zero metrics are left out
            chunk[key] = int(stats[key])
    return chunk
