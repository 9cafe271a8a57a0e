"""How a job's items become chunks: prefix grouping, duplicates together, cached results never queued.

Prefix grouping: a job's prompts are cut into chunks sorted by their text, so prompts that share a prefix (a
long rubric before each input, a few templates interleaved) land in the same chunks and run side by side, where
a worker's decode loop prefills the shared prefix once and copies it to the others (workers/decode_loop.py
``_admit``).  Sorting happens in windows of about :data:`WINDOW` items, so a million-line upload still streams
into the database with bounded memory; within a window, lexicographic order puts every prompt next to those
that share its longest prefix.  Items keep their ``seq`` (input order), so results come back in input order.

Deduplication (jobs/dedup.py): every item with the key of an earlier one joins that one's chunk, where the
worker runs the request once; with the job's ``cache`` on, an item whose key the result cache holds is stored
with that result (``cached``) and in no chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from sqlalchemy import Table, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.errors import BadRequest
from jobs import dedup
from jobs.models import Chunk, ChunkState, Item, ItemState, utcnow

INSERT_BATCH = 1000
ITEMS = cast(Table, Item.__table__)
CHUNKS = cast(Table, Chunk.__table__)
# Each chunk is one Celery message and one Redis marker: a million one-item chunks would be a million of each.
MAX_CHUNKS = 100_000

WINDOW = 10_000
Pending = tuple[int, str | None, dict[str, Any]]  # (seq, custom_id, body) of an item not yet written
KEY_CHARS = 8192  # prompts that agree this far are grouped together whatever follows
GROUP_CHARS = 256  # prompts that open with the same this many characters share a prefix worth grouping


def prompt_key(kind: str, body: dict[str, Any]) -> str:
    """The text a prompt's rendering starts with, in the order the template renders it: the system prompt, then
    the prompt (generate) or the messages (chat).  Embedding inputs have no prefix to share."""
    if kind == "generate":
        text = f"{body.get('system') or ''}\x00{body.get('prompt') or ''}"
    elif kind == "chat":
        messages = body.get("messages") or []
        text = "\x00".join(f"{m.get('role')}\x01{m.get('content')}" for m in messages if isinstance(m, dict))
    else:
        return ""
    return text[:KEY_CHARS]


def window_size(chunk_size: int) -> int:
    """Items sorted together: a whole number of chunks, so with grouping off the chunks are cut exactly as
    before (every ``chunk_size`` items in input order)."""
    return chunk_size * max(1, WINDOW // chunk_size)


def grouped(kind: str, window: list[Pending], texts: dict[int, str] | None = None) -> list[Pending]:
    """``(seq, custom_id, body)`` rows of one window in chunking order: by prompt text (``texts``: each seq's
    :func:`prompt_key`, when the caller has them), then input order."""
    if kind not in ("generate", "chat"):
        return window
    if texts is None:
        texts = {row[0]: prompt_key(kind, row[2]) for row in window}
    return sorted(window, key=lambda row: (texts[row[0]], row[0]))


@dataclass
class ChunkWriter:
    """Writes one job's items, a window at a time, into chunks (see the module docstring)."""

    session: Session
    job_id: str
    kind: str
    model_digest: str  # the GGUF's: the chunk's queue
    model_id: str  # the manifest's: what a request key names
    size: int
    options: dict[str, Any]
    new_id: Callable[[], str]
    group: bool = True
    cache_ttl: int = 0  # > 0: the job takes cached results
    chunk_ids: list[str] = field(default_factory=list)
    cached: int = 0
    _chunk_of_key: dict[str, str] = field(default_factory=dict)

    def write(self, window: list[Pending]) -> None:
        texts = {row[0]: prompt_key(self.kind, row[2]) for row in window} if self.group else {}
        ordered = grouped(self.kind, window, texts) if self.group else window
        keyed = [(row, dedup.request_key(self.model_id, self.kind, row[2], self.options)) for row in ordered]
        hits = dedup.lookup(self.session, [k for _, k in keyed if k], self.cache_ttl) if self.cache_ttl else {}
        chunks: list[dict[str, Any]] = []
        pending: list[tuple[Any, ...]] = []  # PENDING_COLUMNS
        cached: list[dict[str, Any]] = []
        filled = self.size  # items in the newest chunk (full: the next item opens one)
        opening, in_run = "", False
        for (seq, custom_id, body), key in keyed:
            # Where a run of prompts that share a long opening ends, a chunk at least half full closes, so that
            # fewer chunks hold the tail of one prefix and the head of the next (and prefill both).  Unrelated
            # prompts are no run, and fill their chunks (at most twice the chunks overall).
            if self.group:
                text = texts[seq]
                shares = len(text) >= GROUP_CHARS and text[:GROUP_CHARS] == opening
                if in_run and not shares and filled >= self.size // 2 and len(self.chunk_ids) < MAX_CHUNKS // 2:
                    filled = self.size
                opening, in_run = text[:GROUP_CHARS], shares
            hit = hits.get(key) if key else None
            if hit is not None:
                cached.append({"job_id": self.job_id, "seq": seq, "custom_id": custom_id, "input": body, "attempts": 0,
                               "chunk_id": None, "state": ItemState.SUCCEEDED, "output": hit.output, "cached": True,
                               "prompt_tokens": hit.prompt_tokens, "completion_tokens": hit.completion_tokens,
                               "finished_at": utcnow()})
                self.cached += 1
                continue
            chunk_id = self._chunk_of_key.get(key) if key else None
            if chunk_id is None:
                if filled >= self.size:
                    chunks.append(self._new_chunk())
                    filled = 0
                chunk_id = self.chunk_ids[-1]
                filled += 1
                if key and len(self._chunk_of_key) < dedup.MAX_TRACKED_KEYS:
                    self._chunk_of_key[key] = chunk_id
            pending.append((self.job_id, chunk_id, seq, custom_id, body, ItemState.PENDING, 0))
        # Core inserts (the tables, not the ORM classes): the ORM's bulk path costs more than SQLite's own work.
        if chunks:
            insert_chunks(self.session, chunks)
        insert_pending(self.session, pending)
        for start in range(0, len(cached), INSERT_BATCH):
            self.session.execute(insert(ITEMS), cached[start : start + INSERT_BATCH])

    def _new_chunk(self) -> dict[str, Any]:
        if len(self.chunk_ids) == MAX_CHUNKS:
            raise BadRequest(
                f"a job may have at most {MAX_CHUNKS} chunks: use a chunk_size above {self.size} for more "
                f"than {MAX_CHUNKS * self.size} items"
            )
        self.chunk_ids.append(self.new_id())
        return {"id": self.chunk_ids[-1], "job_id": self.job_id, "model_digest": self.model_digest,
                "seq": len(self.chunk_ids) - 1, "state": ChunkState.QUEUED, "enqueued_at": utcnow(), "held": True}


class Pipelined:
    """A :class:`ChunkWriter` whose windows are written on a thread of their own while the caller reads and
    checks the next window, so that PostgreSQL's server process works on one window's COPY while this process
    parses the next (measured: ~10% off a million-line upload).  Not for SQLite (``threaded=False``: each
    window is written at once), whose inserts run in this process and only fought the parser for Python's
    lock (~15% slower threaded).  At most one window is in flight; the session is used by one thread at a time
    (the caller's again when the ``with`` block ends).  A write's error is raised by the next :meth:`write` or
    at the block's end; when the block itself fails, the write in flight is waited for and its error dropped."""

    def __init__(self, writer: ChunkWriter, *, threaded: bool) -> None:
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-ingest") if threaded else None
        self._pending: Future[None] | None = None

    def write(self, window: list[Pending]) -> None:
        if self._pool is None:
            self.writer.write(window)
            return
        self._wait()
        self._pending = self._pool.submit(self.writer.write, window)

    def __enter__(self) -> Pipelined:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            self._wait()
        except Exception:
            if kind is None:  # the last window's error; a failed block's own error is the one to report
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


PENDING_COLUMNS = ("job_id", "chunk_id", "seq", "custom_id", "input", "state", "attempts")


def insert_pending(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """Insert new pending items as fast as the driver takes them: PostgreSQL's ``COPY`` through psycopg, SQLite's
    ``executemany`` on pre-encoded JSON; SQLAlchemy's per-row parameter processing cost more than the database's
    own work on a million-line upload.  Other drivers get SQLAlchemy's insert.  ``rows`` are tuples of
    :data:`PENDING_COLUMNS`, the input not yet encoded."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "sqlite" or _copies(session):
        values = [(*r[:4], _dumps(r[4]), *r[5:]) for r in rows]
        try:
            if connection.dialect.name == "sqlite":
                raw = connection.connection.dbapi_connection
                assert raw is not None
                raw.cursor().executemany(
                    f"INSERT INTO job_items ({', '.join(PENDING_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            else:
                _copy(session, "job_items", PENDING_COLUMNS, values)
        except connection.dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
            raise _duplicate(exc) from exc
        return
    try:
        for start in range(0, len(rows), INSERT_BATCH):
            session.execute(insert(ITEMS), [dict(zip(PENDING_COLUMNS, r)) for r in rows[start : start + INSERT_BATCH]])
    except IntegrityError as exc:
        raise _duplicate(exc) from exc


CHUNK_COLUMNS = ("id", "job_id", "model_digest", "seq", "state", "enqueued_at", "held")


def insert_chunks(session: Session, chunks: list[dict[str, Any]]) -> None:
    """New chunks (:meth:`ChunkWriter._new_chunk`'s rows): by ``COPY`` on PostgreSQL through psycopg (62,500 rows
    for a million items in chunks of 16), SQLAlchemy's insert elsewhere."""
    if _copies(session):
        _copy(session, "job_chunks", CHUNK_COLUMNS, [[chunk[c] for c in CHUNK_COLUMNS] for chunk in chunks])
    else:
        session.execute(insert(CHUNKS), chunks)


def _copies(session: Session) -> bool:
    """Whether the session's database takes rows by ``COPY`` (PostgreSQL through psycopg)."""
    dialect = session.connection().dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg"


def _copy(session: Session, table: str, columns: tuple[str, ...], rows: list[Any]) -> None:
    """``COPY table (columns) FROM STDIN`` of ``rows`` on the session's psycopg connection."""
    raw = session.connection().connection.dbapi_connection
    assert raw is not None
    cursor: Any = raw.cursor()
    with cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _dumps(value: Any) -> str:
    """JSON text of an item's input: orjson's, or the standard library's for what orjson cannot write (an
    integer beyond 64 bits, which Python's JSON parser took)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False)


def _duplicate(exc: Exception) -> BadRequest:
    """The unique index on (job, custom_id) refused a line: lines far apart in the upload share a custom_id
    (PostgreSQL names it; SQLite does not)."""
    detail = str(getattr(exc, "orig", exc)).strip().splitlines()
    said = next((line for line in detail if "Key (" in line), "")
    return BadRequest(f"duplicate custom_id: every line's custom_id must be unique within the job{f' ({said})' if said else ''}")
