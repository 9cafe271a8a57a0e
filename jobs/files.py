"""OpenAI's Files API, stored in SQL: uploads are cut into 1 MiB parts as they stream in.

Keeping the bytes in the database (not on one API host's disk) means any API replica can serve a file and a
batch can be created from it anywhere; a batch copies the lines into job items at creation, so deleting the
input file afterwards loses nothing.  A batch's output and error files are rows without parts: their content
is rendered from the job's items when read (see :mod:`jobs.batches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.orm import Session

from corral.errors import BadRequest, NotFound, PayloadTooLarge
from corral.settings import Settings
from jobs.db import sessions
from jobs.ids import openai_id
from jobs.models import FILE_PURPOSES, FilePart, StoredFile, utcnow

PART_SIZE = 1 << 20
UPLOAD_PURPOSES = tuple(p for p in FILE_PURPOSES if p != "batch_output")


def new_file_id() -> str:
    return openai_id("file-")


def epoch(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())


def cursor_page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list object for cursor paging (``after`` = the last id of the previous page)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def file_object(row: StoredFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": int(row.bytes),
        "created_at": epoch(row.created_at),
        "expires_at": None,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
    }


@dataclass
class FileStore:
    """Create, read, list and delete files (each optionally owned by an API key)."""

    settings: Settings

    def _session(self) -> Session:
        return sessions(self.settings)()

    def _row(self, session: Session, file_id: str, owner: str | None) -> StoredFile:
        row = session.get(StoredFile, file_id)
        if row is None or row.deleted_at is not None or (owner is not None and row.owner != owner):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return row

    def create(self, stream: IO[bytes], *, filename: str, purpose: str, owner: str | None = None) -> dict[str, Any]:
        """Store an upload part by part (memory stays at one part); over the upload limit: 413, nothing kept."""
        if purpose not in UPLOAD_PURPOSES:
            raise BadRequest(
                f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'", param="purpose"
            )
        file_id = new_file_id()
        total = 0
        with self._session() as session:
            session.add(StoredFile(id=file_id, purpose=purpose, filename=filename[:400] or "upload", bytes=0, owner=owner))
            session.flush()
            seq = 0
            while True:
                data = stream.read(PART_SIZE)
                if not data:
                    break
                total += len(data)
                if total > self.settings.upload_limit:
                    session.rollback()
                    raise PayloadTooLarge(f"file is larger than the upload limit of {self.settings.upload_limit} bytes")
                session.add(FilePart(file_id=file_id, seq=seq, data=data))
                session.flush()
                session.expunge_all()  # keep only the current part in memory
                seq += 1
            if total == 0:
                session.rollback()
                raise BadRequest("the uploaded file is empty", param="file")
            session.execute(update(StoredFile).where(StoredFile.id == file_id).values(bytes=total))
            session.commit()
            return file_object(self._row(session, file_id, owner))

    def get(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        with self._session() as session:
            return file_object(self._row(session, file_id, owner))

    def source(self, file_id: str, owner: str | None = None) -> tuple[str | None, str | None]:
        """(job id, role) for a batch's generated file, (None, None) for an upload; 404 when absent."""
        with self._session() as session:
            row = self._row(session, file_id, owner)
            return row.job_id, row.role

    def list(
        self, *, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc",
        owner: str | None = None,
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise BadRequest("order must be 'asc' or 'desc'", param="order")
        limit = max(1, min(limit, 10000))
        with self._session() as session:
            query = select(StoredFile).where(StoredFile.deleted_at.is_(None))
            if purpose:
                query = query.where(StoredFile.purpose == purpose)
            if owner is not None:
                query = query.where(StoredFile.owner == owner)
            key = (StoredFile.created_at, StoredFile.id)
            if after:
                cursor = self._row(session, after, owner)
                if order == "desc":
                    query = query.where(
                        (StoredFile.created_at < cursor.created_at)
                        | ((StoredFile.created_at == cursor.created_at) & (StoredFile.id < cursor.id))
                    )
                else:
                    query = query.where(
                        (StoredFile.created_at > cursor.created_at)
                        | ((StoredFile.created_at == cursor.created_at) & (StoredFile.id > cursor.id))
                    )
            query = query.order_by(*(k.desc() for k in key) if order == "desc" else key)
            rows = list(session.scalars(query.limit(limit + 1)))
        return cursor_page([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def delete(self, file_id: str, owner: str | None = None) -> dict[str, Any]:
        """Drop an upload's bytes; a generated file keeps a tombstone so its batch does not make it again."""
        with self._session() as session:
            self._row(session, file_id, owner)
            session.execute(delete(FilePart).where(FilePart.file_id == file_id))
            session.execute(update(StoredFile).where(StoredFile.id == file_id).values(deleted_at=utcnow(), bytes=0))
            session.commit()
        return {"id": file_id, "object": "file", "deleted": True}

    def chunks(self, file_id: str) -> Iterator[bytes]:
        """An upload's bytes, one part at a time."""
        seq = 0
        while True:
            with self._session() as session:
                data = session.scalar(select(FilePart.data).where(FilePart.file_id == file_id, FilePart.seq == seq))
            if data is None:
                return
            yield bytes(data)
            seq += 1

    def lines(self, file_id: str, max_line: int) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of an upload, reassembled across part boundaries; blank lines are skipped.

        A line longer than ``max_line`` is yielded cut to ``max_line + 1`` bytes (so the caller can report it)
        and the rest of it is skipped: memory stays bounded whatever the file holds.
        """
        pending = b""
        number = 0
        skipping = False
        for data in self.chunks(file_id):
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                number += 1
                if skipping:
                    skipping = False
                elif line.strip():
                    yield number, line
            if len(pending) > max_line:
                if not skipping:
                    yield number + 1, pending[: max_line + 1]
                skipping, pending = True, b""
        if pending.strip() and not skipping:
            yield number + 1, pending


def cursor_query(session: Session, query: Any, created: Any, ident: Any, order: str, after: str | None,
                 before: str | None, scope: Any = None) -> Any:
    """Order by (created_at, id) and start strictly past the ``after`` object (or stop before ``before``)."""
    desc = order != "asc"
    for cursor, past in ((after, desc), (before, not desc)):
        if cursor is None:
            continue
        anchor_query = select(created).where(ident == cursor)
        if scope is not None:
            anchor_query = anchor_query.where(scope)
        anchor: datetime | None = session.scalar(anchor_query)
        if anchor is None:
            continue
        if past:
            query = query.where((created < anchor) | and_(created == anchor, ident < cursor))
        else:
            query = query.where((created > anchor) | and_(created == anchor, ident > cursor))
    return query.order_by(created.desc(), ident.desc()) if desc else query.order_by(created.asc(), ident.asc())

