"""Ollama's runtime ``options``: which keys exist and which JSON type each must have."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.errors import BadRequest
from corral.settings import parse_request_keep_alive

# Ollama's runtime options and the JSON type each must have (api/types.go Options + Runner).
OPTION_TYPES: dict[str, str] = {
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "num_thread": "integer",
    "num_keep": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "top_k": "integer",
    "repeat_last_n": "integer",
    "draft_num_predict": "integer",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "use_mmap": "boolean",
    "stop": "an array of strings",
}


def parse_options(raw: Any) -> dict[str, Any]:
    """Validate ``options`` the way Ollama does: known keys type-checked, unknown keys ignored."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("json: cannot unmarshal into Go struct field .options of type map[string]interface {}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = OPTION_TYPES.get(key)
        if kind is None or value is None:
            continue  # Ollama logs and ignores unknown (often legacy) keys
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "integer" and number:
            out[key] = int(value)
        elif kind == "float32" and number:
            out[key] = float(value)
        elif kind == "boolean" and isinstance(value, bool):
            out[key] = value
        elif kind == "an array of strings" and isinstance(value, list) and all(isinstance(s, str) for s in value):
            out[key] = value
        else:
            raise BadRequest(f'option "{key}" must be of type {kind}')
    return out


class RuntimeRequest(BaseModel):
    """Fields every model request takes, in Ollama's and (as corral's extension) OpenAI's bodies alike:
    ``model``, ``options`` type-checked as Ollama does, ``keep_alive`` as seconds or a Go duration."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    options: dict[str, Any] = Field(default_factory=dict, description="Runtime options (Ollama's `options`).")
    keep_alive: float | None = Field(None, description="Seconds, or a Go duration string; 0 unloads.")

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, value: Any) -> dict[str, Any]:
        return parse_options(value)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        if value is None:
            return None
        try:
            return parse_request_keep_alive(value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
