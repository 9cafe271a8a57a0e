"""Response schemas, for the OpenAPI document (api/openapi.py) and the schemathesis test that checks replies.

Views build their replies as dicts in the exact wire shapes of the reference; these models describe those
shapes: the fields clients rely on, with their types and nullability.  ``extra="allow"`` because Ollama and
OpenAI both add fields over time and clients must ignore unknown ones; a reply that lacks a field listed here,
or carries one with the wrong type, fails the schemathesis run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors -------------------------------------------------------------------------------------------------


class OllamaError(BaseModel):
    """Every Ollama-family error: ``{"error": "..."}``."""

    error: str


class CohereError(BaseModel):
    """Cohere's errors (``/v2/rerank``): ``{"message": "..."}``."""

    message: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class OpenAIError(BaseModel):
    """Every ``/v1/`` error."""

    error: OpenAIErrorDetail


# -- Ollama ---------------------------------------------------------------------------------------------------


class Version(_Open):
    version: str


class ModelDetails(_Open):
    format: str
    family: str
    parameter_size: str
    quantization_level: str


class ModelEntry(_Open):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails


class TagEntry(ModelEntry):
    capabilities: list[str]


class Tags(_Open):
    models: list[TagEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int


class Running(_Open):
    models: list[RunningModel]


class Show(_Open):
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]


class GenerateChunk(_Open):
    model: str
    created_at: str
    response: str
    done: bool


class ChatMessage(_Open):
    role: str
    content: str


class ChatChunk(_Open):
    model: str
    created_at: str
    message: ChatMessage
    done: bool


class Embed(_Open):
    model: str
    embeddings: list[list[float]]


class Embeddings(_Open):
    embedding: list[float]


class Progress(_Open):
    status: str


# -- jobs -------------------------------------------------------------------------------------------------------


class JobCounts(BaseModel):
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int


class JobView(_Open):
    id: str
    object: Literal["job"]
    kind: str
    model: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
    counts: JobCounts
    progress: float
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None


class JobList(_Open):
    jobs: list[JobView]
    has_more: bool


class Deleted(_Open):
    id: str
    object: str
    deleted: bool


class SearchResults(_Open):
    model: str
    query: str
    results: list[dict[str, Any]]
    backend: Literal["pgvector", "numpy"]  # what ranked the vectors


class Queue(_Open):
    models: list[dict[str, Any]]
    workers: list[dict[str, Any]]


# -- OpenAI -----------------------------------------------------------------------------------------------------


class ModelObject(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelObject] | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int]


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: dict[str, int]


class RerankResult(_Open):
    index: int
    relevance_score: float


class RerankList(_Open):
    """llama.cpp's and Jina's rerank reply (TEI's body gets TEI's bare array instead)."""

    model: str
    object: Literal["list"]
    usage: dict[str, int]
    results: list[RerankResult]


class CohereRerank(_Open):
    id: str
    results: list[RerankResult]
    meta: dict[str, Any]


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str


class FileList(_Open):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(_Open):
    id: str
    object: Literal["file"]
    deleted: bool


class Batch(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    request_counts: dict[str, int]


class BatchList(_Open):
    object: Literal["list"]
    data: list[Batch]
    has_more: bool


class FileUpload(BaseModel):
    """``POST /v1/files`` multipart form."""

    file: bytes
    purpose: str


# -- Anthropic ------------------------------------------------------------------------------------------------


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(_Open):
    """Every error under ``/v1/messages``: ``{"type": "error", "error": {"type", "message"}}``."""

    type: Literal["error"]
    error: AnthropicErrorDetail


class AnthropicMessage(_Open):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: dict[str, Any]


class AnthropicTokenCount(_Open):
    input_tokens: int


class AnthropicModelInfo(_Open):
    type: Literal["model"]
    id: str
    display_name: str
    created_at: str
    lifecycle: str


class AnthropicModelPage(_Open):
    data: list[AnthropicModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


class MessageBatch(_Open):
    id: str
    type: Literal["message_batch"]
    processing_status: Literal["in_progress", "canceling", "ended"]
    request_counts: dict[str, int]
    created_at: str
    expires_at: str
    ended_at: str | None
    cancel_initiated_at: str | None
    archived_at: str | None
    results_url: str | None


class MessageBatchPage(_Open):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class MessageBatchDeleted(_Open):
    id: str
    type: Literal["message_batch_deleted"]


class ResponseObject(_Open):
    """``/v1/responses``: a Response (the fields openai-python's ``Response`` requires)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    usage: dict[str, Any] | None


class ResponseDeleted(_Open):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputItemList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class InputTokens(_Open):
    object: Literal["response.input_tokens"]
    input_tokens: int
