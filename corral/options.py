"""Ollama's runtime ``options``: one typed model of them, split into what decides how a model loads and what
steers sampling, with each option's JSON type, bounds, Ollama's default and its llama.cpp name.

Requests carry options as the JSON object clients sent (``parse_options`` checks it at the API, and at job
submission line by line); a worker reads them through :class:`LoadOptions` and :class:`SamplingOptions`, by
attribute, with Ollama's defaults filled in.  Every option reaches llama.cpp in a worker that other requests
share, so each is bounded here: ``repeat_last_n: 2147483647`` sized an 8 GiB buffer per sequence,
``num_thread: 2000`` made the worker exit.  Ollama itself checks types only; the ranges are corral's.

Accepted and ignored, as Ollama lists its own (:data:`IGNORED`): ``num_batch`` (a model's decode loop batches
every sequence it serves at once, so one request's batch size cannot be its own), ``main_gpu`` (a worker is
pinned to one GPU by ``CUDA_VISIBLE_DEVICES``; route by worker instead), ``use_mmap`` (weights are always
mapped, so workers on one host share their pages) and ``draft_num_predict`` (no draft models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.errors import BadRequest
from corral.settings import parse_request_keep_alive

MAX_CONTEXT = 1 << 17  # 131072 tokens: the longest context of today's open models
Part = Literal["load", "sampling", "ignored"]


@dataclass(frozen=True)
class Option:
    """One of Ollama's options (api/types.go Options + Runner): its JSON type, inclusive bounds, Ollama's default
    (None: corral's setting or the model's decides), the part it belongs to and llama.cpp's name for it."""

    name: str
    type: str
    low: float = -math.inf
    high: float = math.inf
    default: Any = None
    part: Part = "sampling"
    llama: str = ""


OPTIONS: tuple[Option, ...] = (
    Option("num_ctx", "integer", 1, MAX_CONTEXT, None, "load", "n_ctx"),  # default: CORRAL_CONTEXT_LENGTH
    Option("num_gpu", "integer", -1, 1024, -1, "load", "n_gpu_layers"),
    Option("num_thread", "integer", 0, 256, None, "load", "n_threads"),  # also clamped to the worker's cores
    Option("num_batch", "integer", 1, 8192, 512, "ignored", "n_batch"),
    Option("main_gpu", "integer", 0, 64, 0, "ignored", "main_gpu"),
    Option("use_mmap", "boolean", default=True, part="ignored", llama="use_mmap"),
    Option("draft_num_predict", "integer", 0, 1024, 0, "ignored"),
    Option("num_keep", "integer", -1, MAX_CONTEXT, 4, "sampling", "n_keep"),
    Option("seed", "integer", -(1 << 63), (1 << 63) - 1, -1, "sampling", "seed"),
    Option("num_predict", "integer", -2, MAX_CONTEXT, -1, "sampling", "n_predict"),
    Option("top_k", "integer", 0, 1 << 20, 40, "sampling", "top_k"),
    Option("repeat_last_n", "integer", -1, MAX_CONTEXT, 64, "sampling", "penalty_last_n"),
    Option("top_p", "float32", 0, 1, 0.9, "sampling", "top_p"),
    Option("min_p", "float32", 0, 1, 0.0, "sampling", "min_p"),
    Option("typical_p", "float32", 0, 1, 1.0, "sampling", "typ_p"),
    Option("temperature", "float32", 0, 100, 0.8, "sampling", "temp"),
    Option("repeat_penalty", "float32", 0, 100, 1.0, "sampling", "penalty_repeat"),
    Option("presence_penalty", "float32", -100, 100, 0.0, "sampling", "penalty_present"),
    Option("frequency_penalty", "float32", -100, 100, 0.0, "sampling", "penalty_freq"),
    Option("stop", "an array of strings", default=(), part="sampling"),
)
BY_NAME = {o.name: o for o in OPTIONS}
OPTION_TYPES: dict[str, str] = {o.name: o.type for o in OPTIONS}
# Inclusive bounds of each numeric option.
OPTION_RANGES: dict[str, tuple[float, float]] = {o.name: (o.low, o.high) for o in OPTIONS if math.isfinite(o.low)}
IGNORED = tuple(o.name for o in OPTIONS if o.part == "ignored")


@dataclass(frozen=True)
class LoadOptions:
    """What decides how a model loads (two requests that agree share one loaded model); None where corral's
    settings or the model decide."""

    num_ctx: int | None = BY_NAME["num_ctx"].default
    num_gpu: int = BY_NAME["num_gpu"].default
    num_thread: int | None = BY_NAME["num_thread"].default

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> LoadOptions:
        return cls(**_given(cls, options))


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence is sampled and when it ends, with Ollama's defaults (api/types.go DefaultOptions)."""

    temperature: float = BY_NAME["temperature"].default
    top_k: int = BY_NAME["top_k"].default
    top_p: float = BY_NAME["top_p"].default
    min_p: float = BY_NAME["min_p"].default
    typical_p: float = BY_NAME["typical_p"].default
    repeat_penalty: float = BY_NAME["repeat_penalty"].default
    presence_penalty: float = BY_NAME["presence_penalty"].default
    frequency_penalty: float = BY_NAME["frequency_penalty"].default
    repeat_last_n: int = BY_NAME["repeat_last_n"].default
    num_predict: int = BY_NAME["num_predict"].default
    num_keep: int = BY_NAME["num_keep"].default
    seed: int = BY_NAME["seed"].default
    stop: tuple[str, ...] = BY_NAME["stop"].default

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> SamplingOptions:
        given = _given(cls, options)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return cls(**given)


def _given(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``cls``'s part that were set (a None is not), as their types: a pulled model's PARAMETER
    layer reaches here without ``parse_options`` (``"top_k": 40.0``), and ctypes takes no float for an int.  A
    value that is not a number of its type is left to its default."""
    given: dict[str, Any] = {}
    for f in fields(cls):
        value, kind = options.get(f.name), BY_NAME[f.name].type
        try:
            if value is None:
                continue
            if kind == "integer":
                given[f.name] = int(value)
            elif kind == "float32":
                given[f.name] = float(value)
            else:
                given[f.name] = value
        except (TypeError, ValueError, OverflowError):
            continue
    return given


MAX_STOPS = 16  # stop strings are matched against every generated token in the model's shared decode thread
MAX_STOP_LENGTH = 256


def _check_range(key: str, value: float) -> None:
    low, high = BY_NAME[key].low, BY_NAME[key].high
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
