"""corral's own batch wire format: the bodies of ``POST /api/jobs`` and ``POST /v1/batches``, and one job item
(one input line) per kind.

These models are what the views and :mod:`jobs.ingest` validate with, and what ``/openapi.json`` shows.  A job's
lines are checked one at a time (an upload is streamed into the database, and every error must name its line),
so :class:`JobSubmission` leaves its ``items`` to the per-kind item models; the document shows them as the items'
schema all the same.  Errors become one-line messages (:func:`problem`) that the views raise as 400s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.errors import BadRequest
from corral.thinking import check_think
from corral.wire.ollama import MAX_EMBED_INPUTS
from corral.wire.rerank import documents_of, query_of

JOB_KINDS = ("generate", "chat", "embed", "rerank")


NOT_BASE64 = "images must be a list of base64 strings"


def _think_value(value: Any) -> Any:
    try:
        return check_think(value)
    except BadRequest as exc:  # as a validation error, so the message names the line
        raise ValueError(exc.message) from exc


class _Item(BaseModel):
    """Fields every job line may carry beside its request body."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str | None = Field(None, max_length=512, description="Unique within the job; echoed in results.")
    metadata: dict[str, Any] | None = Field(None, description="Stored with the item and returned with its result.")
    options: dict[str, Any] | None = None

    @classmethod
    def stored_fields(cls) -> tuple[str, ...]:
        """The request-body fields kept for the worker (the rest of the line is ignored, as Ollama ignores it)."""
        return tuple(name for name in cls.model_fields if name != "custom_id")


class _GenerationItem(_Item):
    """Fields of generate and chat lines: thinking, and the tokens' log-probabilities."""

    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    _think = field_validator("think", mode="before")(classmethod(lambda cls, value: _think_value(value)))


class GenerateItem(_GenerationItem):
    """One ``/api/generate`` body."""

    prompt: str = Field(None, validate_default=True)  # absent: the validator says so
    system: str | None = None
    raw: bool | None = None
    format: Any = None
    context: list[int] | None = None
    images: list[Any] | None = None  # for a model with vision: checked with the model (jobs/service.py check_item)

    @field_validator("images")
    @classmethod
    def _images(cls, value: Any) -> Any:
        if value is not None and not all(isinstance(image, str) for image in value):
            raise ValueError(NOT_BASE64)
        return value or None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError('a generate item needs a non-empty "prompt" string')
        return value


class ChatItem(_GenerationItem):
    """One ``/api/chat`` body; each message keeps its role (lower-cased, as Ollama does) and content."""

    messages: list[dict[str, Any]] = Field(None, validate_default=True)
    format: Any = None
    tools: list[dict[str, Any]] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
            for m in value
        ):
            raise ValueError('a chat item needs "messages": [{"role": ..., "content": ...}, ...]')
        if not all(isinstance(m.get("images") or [], list) and all(isinstance(i, str) for i in m.get("images") or [])
                   for m in value):
            raise ValueError(NOT_BASE64)
        return [{"role": m["role"].lower(), "content": m.get("content", ""),
                 **({"images": m["images"]} if m.get("images") else {})} for m in value]


class EmbedItem(_Item):
    """One ``/api/embed`` body."""

    input: str | list[str] = Field(None, validate_default=True)
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        ok = (isinstance(value, str) and value) or (
            isinstance(value, list) and value and all(isinstance(x, str) for x in value)
        )
        if not ok:
            raise ValueError('an embed item needs "input": a non-empty string or list of strings')
        if isinstance(value, list) and len(value) > MAX_EMBED_INPUTS:
            raise ValueError(f"an embed item takes at most {MAX_EMBED_INPUTS} inputs")
        return value


class RerankItem(_Item):
    """One ``/v1/rerank`` body: a query and its documents (strings, or ``{text}`` objects, stored as strings)."""

    query: str = Field(None, validate_default=True)
    documents: list[str] = Field(None, validate_default=True)
    top_n: int | None = Field(None, ge=0)
    return_documents: bool | None = None
    truncate: bool | None = None

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> Any:
        try:
            return query_of(value)
        except BadRequest as exc:
            raise ValueError(f"a rerank item: {exc.message}") from exc

    @field_validator("documents", mode="before")
    @classmethod
    def _documents(cls, value: Any) -> Any:
        try:
            return documents_of(value, "documents")
        except BadRequest as exc:
            raise ValueError(f"a rerank item: {exc.message}") from exc


ITEM_MODELS: dict[str, type[_Item]] = {"generate": GenerateItem, "chat": ChatItem, "embed": EmbedItem,
                                       "rerank": RerankItem}

class JobSubmission(BaseModel):
    """``POST /api/jobs`` as JSON (or as a JSONL upload of items with these fields as query parameters)."""

    model_config = ConfigDict(extra="ignore")

    kind: str = Field("generate", description="generate, chat, embed or rerank", json_schema_extra={"enum": list(JOB_KINDS)})
    model: str = ""
    items: list[Any] = Field(description="Request bodies of the job's kind: GenerateItem, ChatItem, EmbedItem or "
                             "RerankItem.")
    options: dict[str, Any] | None = None
    chunk_size: int | None = Field(None, ge=1, le=10_000)
    metadata: dict[str, Any] | None = None
    webhook_url: str | None = Field(None, description="Announce the job's end here (a signed POST; the secret is "
                                    "in this answer's `webhook.secret`, once).")
    cache: bool = Field(False, description="Take results of deterministic requests (temperature 0 or a seed) from "
                        "the result cache, marked `cached`, and add this job's to it.")
    completion_window: str | None = Field(None, description="Finish within this long (90m, 1h, 24h, 7d): chunks are "
                                          "scheduled earliest deadline first, and what is unfinished then expires.")
    priority: int = Field(0, ge=-10, le=10, description="Each point moves the job's scheduling deadline an hour earlier.")

    @classmethod
    def openapi_schema(cls, schema: dict[str, Any], ref: Callable[[type[BaseModel]], dict[str, Any]]) -> dict[str, Any]:
        """The document shows the items as what they are (api/openapi.py calls this with its ``$ref`` maker)."""
        schema["properties"]["items"]["items"] = {"anyOf": [ref(m) for m in ITEM_MODELS.values()]}
        return schema


class BatchRequest(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/responses"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    webhook_url: str | None = Field(None, description="corral: where batch.completed (etc.) is POSTed, signed.")


def problem(exc: ValidationError) -> tuple[str, str | None]:
    """(message, field) for the first error: a validator's own words, else ``field: pydantic's words``."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "value_error":
        return str(err.get("ctx", {}).get("error", err["msg"])), field
    if err["type"] == "missing":
        return f"{field} is required", field
    return f"{field}: {err['msg']}", field


def parse(model: type[BaseModel], data: Any, *, what: str = "the request body") -> Any:
    """Validate a decoded JSON body with ``model``; a failure is a 400 naming the field (OpenAI's ``param``)."""
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field = problem(exc)
        raise BadRequest(message, param=field) from exc
