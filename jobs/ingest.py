"""Read and validate job input, one line at a time, so a million-line upload never sits in memory.

Each line is one request body in the shape of the matching sync endpoint (``/api/generate``: ``prompt``;
``/api/chat``: ``messages``; ``/api/embed``: ``input``) with an optional ``custom_id`` and an optional ``metadata`` object, which comes back with the item's result
(``corral embed`` keeps source path, chunk index and character offsets there).  Every error names
the line, so a user can fix the file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from corral.errors import BadRequest, PayloadTooLarge
from corral.options import parse_options

MAX_LINE_BYTES = 1 << 20
ITEM_FIELDS = {
    "generate": ("prompt", "system", "raw", "format", "options", "context"),
    "chat": ("messages", "format", "options", "tools"),
    "embed": ("input", "truncate", "dimensions", "options"),
}


def buffered(stream: IO[bytes]) -> IO[bytes]:
    """A buffered view of a raw request stream: ``readline`` on werkzeug's unbuffered input reads one byte per
    call (measured: 5.2 s for a 1.5 MB upload, 1.5 million reads)."""
    if isinstance(stream, io.BufferedIOBase):
        return stream
    return io.BufferedReader(stream, 1 << 16)  # type: ignore[arg-type]


def read_jsonl(stream: IO[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded JSON) for each non-blank line of a JSONL stream."""
    stream = buffered(stream)
    number = 0
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line:
            raise PayloadTooLarge(f"line {number}: longer than {max_line} bytes")
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"line {number}: not valid JSON ({exc})") from exc


def text_lines(stream: IO[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Plain text: each non-blank line is a prompt (``corral submit --lines``)."""
    stream = buffered(stream)
    for number, raw in enumerate(iter(lambda: stream.readline(max_line + 1), b""), start=1):
        if len(raw) > max_line:
            raise PayloadTooLarge(f"line {number}: longer than {max_line} bytes")
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if text.strip():
            yield number, {"prompt": text}


def validate_item(kind: str, number: int, obj: Any) -> tuple[str | None, dict[str, Any]]:
    """Check one line against the job's kind; return (custom_id, the stored request body)."""
    where = f"line {number}"
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: expected a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if custom_id is not None and not isinstance(custom_id, str):
        raise BadRequest(f"{where}: custom_id must be a string")
    if custom_id is not None and len(custom_id) > 512:
        raise BadRequest(f"{where}: custom_id is longer than 512 characters")
    body = {k: obj[k] for k in ITEM_FIELDS[kind] if k in obj and obj[k] is not None}
    if kind == "generate":
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise BadRequest(f'{where}: a generate item needs a non-empty "prompt" string')
    elif kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
            for m in messages
        ):
            raise BadRequest(f'{where}: a chat item needs "messages": [{{"role": ..., "content": ...}}, ...]')
        body["messages"] = [{"role": m["role"].lower(), "content": m.get("content", "")} for m in messages]
    else:
        value = body.get("input")
        ok = isinstance(value, str) and value or (
            isinstance(value, list) and value and all(isinstance(x, str) for x in value)
        )
        if not ok:
            raise BadRequest(f'{where}: an embed item needs "input": a non-empty string or list of strings')
    metadata = obj.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest(f"{where}: metadata must be an object")
        body["metadata"] = metadata
    if "options" in body:
        try:
            body["options"] = parse_options(body["options"])
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc.message}") from exc
    return custom_id, body


def validated(kind: str, lines: Iterable[tuple[int, Any]]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Validate lines in order, rejecting duplicate custom_ids."""
    seen: set[str] = set()
    for number, obj in lines:
        custom_id, body = validate_item(kind, number, obj)
        if custom_id is not None:
            if custom_id in seen:
                raise BadRequest(f'line {number}: duplicate custom_id "{custom_id}"')
            seen.add(custom_id)
        yield custom_id, body
