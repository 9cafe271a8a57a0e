"""How a job's items become chunks: prefix grouping, duplicates together, cached results never queued.

Prefix grouping: a job's prompts are cut into chunks sorted by their text, so prompts that share a prefix (a
long rubric before each input, a few templates interleaved) land in the same chunks and run side by side, where
a worker's decode loop prefills the shared prefix once and copies it to the others (workers/decode_loop.py
``_admit``).  Sorting happens in windows of about :data:`WINDOW` items, so a million-line upload still streams
into the database with bounded memory; within a window, lexicographic order puts every prompt next to those
that share its longest prefix.  Items keep their ``seq`` (input order), so results come back in input order.

Deduplication (jobs/dedup.py): every item with the key of an earlier one joins that one's chunk, where the
worker runs the request once; with the job's ``cache`` on, an item whose key the result cache holds for the
job's owner is stored with that result (``cached``) and in no chunk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
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
    """Writes one job's items, a window at a time, into chunks (see the module docstring).  A context manager:
    the job's chunk rows are written when the block ends, and a failed block leaves the session's transaction
    to be rolled back (an unfinished ``COPY`` is ended first, so that the rollback can run)."""

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
    cache_scope: str = ""  # whose cached results: dedup.cache_scope of the job's owner
    chunk_ids: list[str] = field(default_factory=list)
    cached: int = 0
    _chunk_of_key: dict[str, str] = field(default_factory=dict)
    _items: PendingItems = field(init=False)

    def __post_init__(self) -> None:
        self._items = PendingItems(self.session)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if kind is not None:
            self._items.abort(kind, error, trace)
            return
        self._items.end()
        insert_chunks(self.session, self.job_id, self.model_digest, self.chunk_ids)

    def write(self, window: list[Pending]) -> None:
        texts = {row[0]: prompt_key(self.kind, row[2]) for row in window} if self.group else {}
        ordered = grouped(self.kind, window, texts) if self.group else window
        keyed = [(row, dedup.request_key(self.model_id, self.kind, row[2], self.options)) for row in ordered]
        hits: dict[str, Any] = {}
        if self.cache_ttl:
            self._items.end()  # the session runs other statements
            hits = dedup.lookup(self.session, [k for _, k in keyed if k], self.cache_ttl, self.cache_scope)
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
                    self._new_chunk()
                    filled = 0
                chunk_id = self.chunk_ids[-1]
                filled += 1
                if key and len(self._chunk_of_key) < dedup.MAX_TRACKED_KEYS:
                    self._chunk_of_key[key] = chunk_id
            pending.append((self.job_id, chunk_id, seq, custom_id, body, ItemState.PENDING, 0))
        self._items.write(pending)
        if cached:
            self._items.end()
            for start in range(0, len(cached), INSERT_BATCH):
                self.session.execute(insert(ITEMS), cached[start : start + INSERT_BATCH])

    def _new_chunk(self) -> None:
        if len(self.chunk_ids) == MAX_CHUNKS:
            raise BadRequest(
                f"a job may have at most {MAX_CHUNKS} chunks: use a chunk_size above {self.size} for more "
                f"than {MAX_CHUNKS * self.size} items"
            )
        self.chunk_ids.append(self.new_id())


PENDING_COLUMNS = ("job_id", "chunk_id", "seq", "custom_id", "input", "state", "attempts")


class PendingItems:
    """New pending items, inserted as fast as the driver takes them.  SQLAlchemy's per-row parameter processing
    cost more than the database's own work on a million-line upload, so:

    - on PostgreSQL through psycopg, one ``COPY job_items FROM STDIN`` stays open across windows, ended only when
      the session must run another statement (:meth:`end`).  The server stores rows while this process parses
      the next lines; a ``COPY`` per window made each side wait for the other at every window's end (measured:
      a million-line upload went from 30-38 s to 15-17 s, bench/README.md);
    - on SQLite, ``executemany`` on pre-encoded JSON;
    - other drivers get SQLAlchemy's insert.

    Rows are tuples of :data:`PENDING_COLUMNS`, the input not yet encoded."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.dialect = session.connection().dialect
        self.mode = "sqlite" if self.dialect.name == "sqlite" else "copy" if _copies(session) else "insert"
        self._copy: contextlib.ExitStack | None = None
        self._rows: Any = None  # the open COPY's write_row

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self.mode == "insert":
            try:
                for start in range(0, len(rows), INSERT_BATCH):
                    self.session.execute(
                        insert(ITEMS), [dict(zip(PENDING_COLUMNS, r)) for r in rows[start : start + INSERT_BATCH]])
            except IntegrityError as exc:
                raise _duplicate(exc) from exc
            return
        values = [(*r[:4], _dumps(r[4]), *r[5:]) for r in rows]
        with self._refused():
            if self.mode == "sqlite":
                raw = self.session.connection().connection.dbapi_connection
                assert raw is not None
                raw.cursor().executemany(
                    f"INSERT INTO job_items ({', '.join(PENDING_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
                return
            if self._copy is None:
                self._copy = contextlib.ExitStack()
                self._rows = self._copy.enter_context(_copy_in(self.session, "job_items", PENDING_COLUMNS)).write_row
            write_row = self._rows
            for value in values:
                write_row(value)

    def end(self) -> None:
        """End the open ``COPY``, if any, waiting for the server to store its rows."""
        if self._copy is not None:
            copy, self._copy = self._copy, None
            with self._refused():
                copy.close()

    def abort(self, kind: type[BaseException], error: BaseException | None, trace: Any) -> None:
        """End the open ``COPY`` as failed (the caller rolls back); its own error is dropped for the caller's."""
        if self._copy is not None:
            copy, self._copy = self._copy, None
            with contextlib.suppress(Exception):
                copy.__exit__(kind, error, trace)

    @contextlib.contextmanager
    def _refused(self) -> Iterator[None]:
        try:
            yield
        except self.dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
            raise _duplicate(exc) from exc


CHUNK_COLUMNS = ("id", "job_id", "model_digest", "seq", "state", "enqueued_at", "held")


def insert_chunks(session: Session, job_id: str, model_digest: str, chunk_ids: list[str]) -> None:
    """A job's chunks, queued and held for the dispatcher, ``chunk_ids`` in order: by ``COPY`` on PostgreSQL
    through psycopg (62,500 rows for a million items in chunks of 16), SQLAlchemy's insert elsewhere."""
    if not chunk_ids:
        return
    now = utcnow()
    rows = ((chunk_id, job_id, model_digest, seq, ChunkState.QUEUED, now, True) for seq, chunk_id in enumerate(chunk_ids))
    if _copies(session):
        with _copy_in(session, "job_chunks", CHUNK_COLUMNS) as copy:
            for row in rows:
                copy.write_row(row)
        return
    for batch in iter(lambda: list(itertools.islice(rows, INSERT_BATCH)), []):
        session.execute(insert(CHUNKS), [dict(zip(CHUNK_COLUMNS, row)) for row in batch])


def _copies(session: Session) -> bool:
    """Whether the session's database takes rows by ``COPY`` (PostgreSQL through psycopg)."""
    dialect = session.connection().dialect
    return dialect.name == "postgresql" and dialect.driver == "psycopg"


@contextlib.contextmanager
def _copy_in(session: Session, table: str, columns: tuple[str, ...]) -> Iterator[Any]:
    """``COPY table (columns) FROM STDIN`` on the session's psycopg connection: yields psycopg's ``Copy``."""
    raw = session.connection().connection.dbapi_connection
    assert raw is not None
    cursor: Any = raw.cursor()
    with cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        yield copy


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
