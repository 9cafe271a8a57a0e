"""Ollama's runtime ``options``: which keys exist, which JSON type each must have, and the range each must be in.

Every option reaches llama.cpp in a worker that other requests share, so each is bounded here, at the API (and
at job submission, line by line): ``repeat_last_n: 2147483647`` sized an 8 GiB buffer per sequence,
``num_thread: 2000`` made the worker exit.  Ollama itself checks types only; the ranges are corral's.
"""

from __future__ import annotations

import math
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


MAX_CONTEXT = 1 << 17  # 131072 tokens: the longest context of today's open models
# Inclusive bounds of each numeric option (num_thread is also clamped to the worker's own cores there).
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "num_ctx": (1, MAX_CONTEXT),
    "num_batch": (1, 8192),
    "num_gpu": (-1, 1024),
    "main_gpu": (0, 64),
    "num_thread": (0, 256),
    "num_keep": (-1, MAX_CONTEXT),
    "seed": (-(1 << 63), (1 << 63) - 1),
    "num_predict": (-2, MAX_CONTEXT),
    "top_k": (0, 1 << 20),
    "repeat_last_n": (-1, MAX_CONTEXT),
    "draft_num_predict": (0, 1024),
    "top_p": (0, 1),
    "min_p": (0, 1),
    "typical_p": (0, 1),
    "temperature": (0, 100),
    "repeat_penalty": (0, 100),
    "presence_penalty": (-100, 100),
    "frequency_penalty": (-100, 100),
}
MAX_STOPS = 16  # stop strings are matched against every generated token in the model's shared decode thread
MAX_STOP_LENGTH = 256


def _check_range(key: str, value: float) -> None:
    low, high = OPTION_RANGES.get(key, (-math.inf, math.inf))
    if not (math.isfinite(value) and low <= value <= high):
        shown = [str(int(b)) if float(b).is_integer() else str(b) for b in (low, high)]
        raise BadRequest(f'option "{key}" must be between {shown[0]} and {shown[1]}')


def parse_options(raw: Any) -> dict[str, Any]:
    """Validate ``options`` the way Ollama does (known keys type-checked, unknown keys ignored), and bound each."""
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
        if kind == "integer" and number and (isinstance(value, int) or math.isfinite(value)):
            _check_range(key, value)
            out[key] = int(value)
        elif kind == "float32" and number:
            _check_range(key, value)
            out[key] = float(value)
        elif kind == "boolean" and isinstance(value, bool):
            out[key] = value
        elif kind == "an array of strings" and isinstance(value, list) and all(isinstance(s, str) for s in value):
            if len(value) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in value):
                raise BadRequest(f'option "{key}" takes at most {MAX_STOPS} strings of at most {MAX_STOP_LENGTH} characters')
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
