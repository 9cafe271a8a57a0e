"""Request bodies of the batch routes, as the OpenAPI document shows them.

The job and batch services validate these bodies themselves, item by item and line by line (jobs/ingest.py,
jobs/batches.py), because uploads are streamed and their errors must name the line; these models state the
same shapes for the document and for clients.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class JobItem(BaseModel):
    """One prompt, conversation or input; the fields of the matching sync request body."""

    model_config = ConfigDict(extra="allow")

    custom_id: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    input: str | list[str] | None = None


class JobSubmission(BaseModel):
    """``POST /api/jobs`` as JSON (or as a JSONL upload of items with these fields as query parameters)."""

    kind: Literal["generate", "chat", "embed"] = "generate"
    model: str
    items: list[JobItem]
    options: dict[str, Any] | None = None
    chunk_size: int | None = None
    metadata: dict[str, Any] | None = None


class BatchRequest(BaseModel):
    """``POST /v1/batches``."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
