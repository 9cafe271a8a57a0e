"""Read and validate job input, one line at a time, so a million-line upload never sits in memory.

Each line is one request body in the shape of the matching sync endpoint (``/api/generate``: ``prompt``;
``/api/chat``: ``messages``; ``/api/embed``: ``input``), checked by its kind's model in :mod:`corral.wire.jobs`, with an
optional ``custom_id`` and an optional ``metadata`` object, which comes back with the item's result (``corral
embed`` keeps source path, chunk index and character offsets there).  Every error names the line, so a user
can fix the file.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson
from pydantic import ValidationError

from corral.errors import BadRequest, PayloadTooLarge
from corral.options import parse_options
from corral.wire.jobs import ITEM_MODELS, problem
from corral.wire.ollama import MAX_JSON_DEPTH, check_format, parse_json

MAX_LINE_BYTES = 1 << 20
_STANDARD = object()  # a line for the standard parser (corral.wire.ollama.parse_json)


def buffered(stream: IO[bytes]) -> IO[bytes]:
    """A buffered view of a raw request stream: ``readline`` on werkzeug's unbuffered input reads one byte per
    call (measured: 5.2 s for a 1.5 MB upload, 1.5 million reads)."""
    if isinstance(stream, io.BufferedIOBase):
        return stream
    return io.BufferedReader(stream, 1 << 16)  # type: ignore[type-var]


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
        # orjson takes valid UTF-8 only and no NaN, as parse_json does, faster.  parse_json decides the rest: a line
        # that may nest too deep, and one orjson refuses (its error in the standard parser's words, or an integer
        # beyond 64 bits, which Python's JSON takes)
        try:
            value = orjson.loads(line) if line.count(b"{") + line.count(b"[") < MAX_JSON_DEPTH else _STANDARD
        except orjson.JSONDecodeError:
            value = _STANDARD
        if value is _STANDARD:
            try:
                value = parse_json(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadRequest(f"line {number}: not valid JSON ({exc})") from exc
            except BadRequest as exc:
                raise BadRequest(f"line {number}: {exc.message}") from exc
        yield number, value


def text_lines(stream: IO[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """Plain text: each non-blank line is a prompt (``corral submit --lines``)."""
    stream = buffered(stream)
    for number, raw in enumerate(iter(lambda: stream.readline(max_line + 1), b""), start=1):
        if len(raw) > max_line:
            raise PayloadTooLarge(f"line {number}: longer than {max_line} bytes")
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if text.strip():
            yield number, {"prompt": text}


@functools.cache
def _stored(kind: str) -> set[str]:
    return set(ITEM_MODELS[kind].stored_fields())


# The keys of the commonest generate line, and the types the item model takes for them unchanged: such a line
# skips the model (a million-line upload spent a fifth of its time there).  tests/unit/test_parsing.py checks
# that both ways give the same body.
_PLAIN_GENERATE = {"custom_id": str, "prompt": str, "system": str, "options": dict, "metadata": dict}


def _plain_generate(obj: dict[str, Any]) -> tuple[str | None, dict[str, Any]] | None:
    """(custom_id, body) of a generate line made only of :data:`_PLAIN_GENERATE` keys of their exact types (or
    null), a non-empty prompt and a custom_id of at most 512 characters; None for any other line."""
    body: dict[str, Any] = {}
    for key, value in obj.items():
        wanted = _PLAIN_GENERATE.get(key)
        if wanted is None:
            return None
        if value is not None:
            if type(value) is not wanted:
                return None
            body[key] = value
    custom_id = body.pop("custom_id", None)
    if not body.get("prompt") or (custom_id is not None and len(custom_id) > 512):
        return None
    if "options" in body:
        body["options"] = parse_options(body["options"])
    return custom_id, body


def validate_item(kind: str, number: int, obj: Any) -> tuple[str | None, dict[str, Any]]:
    """Check one line with its kind's item model (:mod:`corral.wire.jobs`); return (custom_id, the stored body)."""
    where = f"line {number}"
    if not isinstance(obj, dict):
        raise BadRequest(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if kind == "generate":
        try:
            plain = _plain_generate(obj)
        except BadRequest as exc:  # its options
            raise BadRequest(f"{where}: {exc.message}") from exc
        if plain is not None:
            return plain
    model = ITEM_MODELS[kind]
    try:
        item = model.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(f"{where}: {problem(exc)[0]}") from exc
    body = item.model_dump(include=_stored(kind), exclude_none=True)
    if "format" in body:
        try:
            body["format"] = check_format(body["format"])
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc.message}") from exc
        if body["format"] is None:
            del body["format"]
    if "options" in body:
        try:
            body["options"] = parse_options(body["options"])
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc.message}") from exc
    return item.custom_id, body


SEEN_IDS = 10_000


def validated(kind: str, lines: Iterable[tuple[int, Any]]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Validate lines in order, rejecting duplicate custom_ids: those within :data:`SEEN_IDS` lines of each
    other here, with both line numbers; the database's unique index refuses the rest (jobs/grouping.py), so
    memory stays flat however long the upload."""
    seen: dict[str, int] = {}
    for number, obj in lines:
        custom_id, body = validate_item(kind, number, obj)
        if custom_id is not None:
            if custom_id in seen:
                raise BadRequest(f'line {number}: duplicate custom_id "{custom_id}" (also on line {seen[custom_id]})')
            if len(seen) >= SEEN_IDS:
                seen.clear()
            seen[custom_id] = number
        yield custom_id, body
