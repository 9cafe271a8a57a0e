"""Collections: named corpora kept in sync, behind OpenAI's Vector Stores API and ``corral collection``.

A collection's documents are the record (``collection_documents``); their chunks and vectors are derived from
them by an ``index`` job on the batch engine, one item per document (workers/indexing.py).  So syncing is
durable as every job is: the document rows and the job that indexes them are written in one transaction and
committed before anything is enqueued, a killed worker's items run again, and a document's chunks are replaced
in one transaction with its status (:mod:`jobs.collection_index`), so a search sees the old chunks or the new
ones, never a mix and never neither.  Each document names the job indexing it (``job_id``): the result of an
older sync still running when a newer one started is refused.

Only changed documents cost an embedding: a document is identified by its ``source_id`` (a File id, or a path for
the CLI) and the sha256 of its bytes, and one whose bytes, chunking and model are those indexed is skipped.
``file_counts`` and a store's status are computed from the rows, never kept as counters; a document whose item
ended without indexing it (failed after its retries, cancelled) is settled to ``failed`` or ``cancelled`` when it
is read, so every file reaches a terminal state and ``upload_and_poll`` returns.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from corral.errors import BadRequest, Conflict, NotFound
from corral.modelstore.store import ModelRecord, ModelStore
from corral.settings import Settings
from corral.wire.vector_stores import Chunking, FileSpec, SyncDocument
from jobs import collection_search
from jobs.collection_index import INDEX_KIND, chunking_view, context_length, document_view, resolve_chunking, settle
from jobs.db import read_after_commit, sessions
from jobs.files import cursor_page, cursor_query, epoch
from jobs.ids import openai_id
from jobs.keys import Principal
from jobs.models import (
    Collection,
    CollectionBatch,
    CollectionChunk,
    CollectionDocument,
    StoredFile,
    as_utc,
    utcnow,
)
from jobs.service import JobService

DEFAULT_MODEL = "all-minilm"
INDEX_CHUNK_SIZE = 8  # documents per Celery task: a chunk of documents is a few seconds of embedding
MAX_SYNC_DOCUMENTS = 100_000
TOUCH_EVERY = timedelta(minutes=1)  # how stale a store's last_active_at may get before a search writes it (days count)

IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "in_progress", "completed", "failed", "cancelled"
STATUSES = (IN_PROGRESS, COMPLETED, FAILED, CANCELLED)


@dataclass(frozen=True)
class SearchTarget:
    """What a search of a collection needs: its id, and the model (by name and digest) its vectors come from."""

    collection_id: str
    model: str
    model_digest: str


@dataclass
class CollectionService:
    """The collection operations the HTTP API (and through it the CLI) offers; every object belongs to a key."""

    settings: Settings
    store: ModelStore
    jobs: JobService

    def _session(self) -> Session:
        return sessions(self.settings)()

    # -- stores -----------------------------------------------------------------------------------------

    def _collection(self, session: Session, store_id: str, owner: str | None) -> Collection:
        row = session.get(Collection, store_id)
        if row is None or (owner is not None and row.owner != owner):
            raise NotFound(f"No vector store found with id '{store_id}'.", param="vector_store_id")
        return row

    @staticmethod
    def _stored_file(session: Session, file_id: str, owner: str | None) -> None:
        """A File the key may read (an upload of its own), or the 404 an unknown one gets."""
        stored = session.get(StoredFile, file_id)
        if stored is None or stored.deleted_at is not None or (owner is not None and stored.owner != owner):
            raise NotFound(f"No such File object: {file_id}", param="file_id")

    def _model(self, name: str, quota: Principal | None) -> ModelRecord:
        record = self.store.get(name)  # 404 in the API's shape when it is not there
        if quota is not None and not quota.limits.allows(name):
            raise NotFound(f"model '{name}' not found")  # as for any model the key may not use
        if "rerank" in record.capabilities or "embedding" not in record.capabilities and "completion" not in record.capabilities:
            raise BadRequest(f"model '{name}' does not embed: a collection needs an embedding model", param="model")
        return record

    def create(
        self, *, owner: str | None, name: str | None = None, description: str | None = None, model: str | None = None,
        chunking: Chunking | None = None, expires_after: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None, file_ids: builtins.list[str] | None = None,
        quota: Principal | None = None,
    ) -> dict[str, Any]:
        """A new store (its model recorded by manifest digest); ``file_ids`` are added as one batch would add them."""
        model = model or DEFAULT_MODEL
        record = self._model(model, quota)
        resolved = resolve_chunking(record, chunking)
        now = utcnow()
        days = int(expires_after["days"]) if expires_after else None
        store_id = openai_id("vs_")
        with self._session() as session:
            for file_id in file_ids or ():  # checked before the store exists: a refused create leaves nothing
                self._stored_file(session, file_id, owner)
            session.add(Collection(
                id=store_id, owner=owner, name=name or "", description=description, model=model,
                model_digest=record.model_digest, chunk_tokens=resolved.max_tokens, chunk_overlap=resolved.overlap,
                meta=metadata, expires_days=days, expires_at=now + timedelta(days=days) if days else None,
                last_active_at=now, created_at=now,
            ))
            session.commit()
        if file_ids:
            self._attach(store_id, owner, [FileSpec(f, None, chunking) for f in file_ids], quota=quota)
        return self.get(store_id, owner)

    def _counts(self, session: Session, store_id: str, batch_id: str | None = None) -> dict[str, int]:
        query = select(CollectionDocument.status, func.count()).where(CollectionDocument.collection_id == store_id)
        if batch_id is not None:
            query = query.where(CollectionDocument.batch_id == batch_id)
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in session.execute(query.group_by(CollectionDocument.status)):
            counts[status] = int(n)
        return {"in_progress": counts[IN_PROGRESS], "completed": counts[COMPLETED], "failed": counts[FAILED],
                "cancelled": counts[CANCELLED], "total": sum(counts.values())}

    def _view(self, session: Session, row: Collection) -> dict[str, Any]:
        settle(session, row.id)
        counts = self._counts(session, row.id)
        usage = session.scalar(select(func.coalesce(func.sum(CollectionDocument.usage_bytes), 0))
                               .where(CollectionDocument.collection_id == row.id))
        expired = row.expires_at is not None and as_utc(row.expires_at) <= utcnow()
        status = "expired" if expired else IN_PROGRESS if counts["in_progress"] else COMPLETED
        view: dict[str, Any] = {
            "id": row.id, "object": "vector_store", "created_at": epoch(row.created_at), "name": row.name,
            "description": row.description, "usage_bytes": int(usage or 0), "file_counts": counts, "status": status,
            "expires_after": {"anchor": "last_active_at", "days": row.expires_days} if row.expires_days else None,
            "expires_at": epoch(row.expires_at), "last_active_at": epoch(row.last_active_at), "metadata": row.meta,
            # corral's: the model the vectors come from, and how documents are chunked
            "model": row.model, "chunking_strategy": chunking_view(row.chunk_tokens, row.chunk_overlap),
        }
        if row.reembed_job:
            view["reembed"] = {"model": row.next_model, "job_id": row.reembed_job}
        return view

    def get(self, store_id: str, owner: str | None) -> dict[str, Any]:
        with self._session() as session:
            view = self._view(session, self._collection(session, store_id, owner))
            session.commit()  # what settle() decided
            return view

    def list(self, *, owner: str | None, limit: int = 20, order: str = "desc", after: str | None = None,
             before: str | None = None, name: str | None = None) -> dict[str, Any]:
        """A page of the key's stores by creation time (``after``/``before``: a store id, strictly past it)."""
        with self._session() as session:
            query = select(Collection)
            if owner is not None:
                query = query.where(Collection.owner == owner)
            if name is not None:
                query = query.where(Collection.name == name)
            query = cursor_query(session, query, Collection.created_at, Collection.id, order, after, before)
            rows = builtins.list(session.scalars(query.limit(limit + 1)))
            data = [self._view(session, r) for r in rows[:limit]]
            session.commit()
            return cursor_page(data, has_more=len(rows) > limit)

    def update(self, store_id: str, owner: str | None, changes: dict[str, Any]) -> dict[str, Any]:
        """``changes`` holds the fields given (each may be None: ``expires_after`` None stops expiry)."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            if "name" in changes:
                row.name = changes["name"] or ""
            if "metadata" in changes:
                row.meta = changes["metadata"]
            if "expires_after" in changes:
                days = int(changes["expires_after"]["days"]) if changes["expires_after"] else None
                row.expires_days = days
                row.expires_at = utcnow() + timedelta(days=days) if days else None
            row.last_active_at = utcnow()
            session.commit()
        return self.get(store_id, owner)

    def delete(self, store_id: str, owner: str | None) -> dict[str, Any]:
        """The store, its documents, chunks and batches; the Files stay (as OpenAI's delete leaves them)."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            jobs = {j for j in session.scalars(select(CollectionDocument.job_id).where(
                CollectionDocument.collection_id == store_id, CollectionDocument.status == IN_PROGRESS)) if j}
            if row.reembed_job:
                jobs.add(row.reembed_job)
            collection_search.forget(session, store_id, None)  # its blocks or HNSW indexes
            session.execute(delete(CollectionChunk).where(CollectionChunk.collection_id == store_id))
            session.execute(delete(CollectionDocument).where(CollectionDocument.collection_id == store_id))
            session.execute(delete(CollectionBatch).where(CollectionBatch.collection_id == store_id))
            session.delete(row)
            session.commit()
        for job_id in jobs:
            self._stop(job_id)
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    def _stop(self, job_id: str) -> None:
        """Cancel an index job whose documents are gone (a job that has ended already is left as it is)."""
        try:
            self.jobs.cancel(job_id)
        except (Conflict, NotFound):
            pass

    def activity(self, store_id: str, owner: str | None) -> builtins.list[str]:
        """The jobs indexing the store now: its documents' syncs in progress, and a re-embed (the console's link)."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            jobs = sorted({j for j in session.scalars(select(CollectionDocument.job_id).where(
                CollectionDocument.collection_id == store_id, CollectionDocument.status == IN_PROGRESS)) if j})
            return [*jobs, *([row.reembed_job] if row.reembed_job else [])]

    def touch(self, store_id: str) -> None:
        """A search or an upload keeps a store with ``expires_after`` alive."""
        with self._session() as session:
            row = session.get(Collection, store_id)
            if row is not None:
                row.last_active_at = utcnow()
                if row.expires_days:
                    row.expires_at = row.last_active_at + timedelta(days=row.expires_days)
                session.commit()

    def search_target(self, store_id: str, owner: str | None) -> SearchTarget:
        """The store's model, checked: still in the store with the digest its vectors were made with."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
                raise BadRequest(f"vector store {store_id} has expired", param="vector_store_id")
            target = SearchTarget(row.id, row.model, row.model_digest)
            stale = utcnow() - as_utc(row.last_active_at) > TOUCH_EVERY
        try:
            record = self.store.get(target.model)
        except NotFound as exc:
            raise Conflict(f"the model '{target.model}' of vector store {store_id} was deleted; re-embed the store "
                           "with another model (corral collection reembed)") from exc
        if record.model_digest != target.model_digest:
            raise Conflict(f"the model '{target.model}' has changed since vector store {store_id} was embedded; "
                           "re-embed it (corral collection reembed)")
        if stale:  # a search is a read: it writes the store's last use only now and then
            self.touch(store_id)
        return target

    # -- files ------------------------------------------------------------------------------------------

    def _document(self, session: Session, store_id: str, file_id: str) -> CollectionDocument:
        doc = session.scalar(select(CollectionDocument).where(
            CollectionDocument.collection_id == store_id, CollectionDocument.file_id == file_id))
        if doc is None:
            raise NotFound(f"No file found with id '{file_id}' in vector store '{store_id}'.", param="file_id")
        return doc

    def add_file(self, store_id: str, owner: str | None, file_id: str, attributes: dict[str, Any] | None = None,
                 chunking: Chunking | None = None, quota: Principal | None = None) -> dict[str, Any]:
        self._attach(store_id, owner, [FileSpec(file_id, attributes, chunking)], quota=quota)
        return read_after_commit(lambda: self.get_file(store_id, owner, file_id), f"the reply for file {file_id}")

    def create_batch(self, store_id: str, owner: str | None, files: builtins.list[FileSpec],
                     quota: Principal | None = None) -> dict[str, Any]:
        batch_id = openai_id("vsfb_")
        self._attach(store_id, owner, files, quota=quota, batch_id=batch_id)
        return read_after_commit(lambda: self.get_batch(store_id, owner, batch_id), f"the reply for {batch_id}")

    def _attach(self, store_id: str, owner: str | None, files: builtins.list[FileSpec], *, quota: Principal | None,
                batch_id: str | None = None) -> None:
        """Add Files to a store (the API's files and file batches): each becomes a document named by its File id,
        indexed unless it is there already with the same chunking and model."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            if row.reembed_job:
                raise Conflict(f"vector store {store_id} is being re-embedded; add files when that job is done")
            record = self._model(row.model, quota)
            for spec in files:
                self._stored_file(session, spec.file_id, owner)
        entries = []
        for spec in files:
            chunking = resolve_chunking(record, spec.chunking) if spec.chunking else Chunking(row.chunk_tokens, row.chunk_overlap)
            entries.append(_Entry(spec.file_id, spec.file_id, None, spec.attributes, chunking, set_attributes=True))
        self._index(store_id, owner, entries, batch_id=batch_id, quota=quota)

    def list_files(self, store_id: str, owner: str | None, *, limit: int = 20, order: str = "desc",
                   after: str | None = None, before: str | None = None, status: str | None = None,
                   batch_id: str | None = None) -> dict[str, Any]:
        with self._session() as session:
            self._collection(session, store_id, owner)
            settle(session, store_id)
            session.commit()
            query = select(CollectionDocument).where(CollectionDocument.collection_id == store_id,
                                                     CollectionDocument.file_id.is_not(None))
            if status is not None:
                query = query.where(CollectionDocument.status == status)
            if batch_id is not None:
                query = query.where(CollectionDocument.batch_id == batch_id)
            query = cursor_query(session, query, CollectionDocument.created_at,
                            CollectionDocument.file_id, order, after, before,
                            scope=CollectionDocument.collection_id == store_id)
            rows = builtins.list(session.scalars(query.limit(limit + 1)))
            return cursor_page([document_view(r) for r in rows[:limit]], has_more=len(rows) > limit)

    def get_file(self, store_id: str, owner: str | None, file_id: str) -> dict[str, Any]:
        with self._session() as session:
            self._collection(session, store_id, owner)
            settle(session, store_id)
            session.commit()
            return document_view(self._document(session, store_id, file_id))

    def update_file(self, store_id: str, owner: str | None, file_id: str,
                    attributes: dict[str, Any] | None) -> dict[str, Any]:
        """New attributes (what filters test): no re-embedding, the chunks stay."""
        with self._session() as session:
            self._collection(session, store_id, owner)
            doc = self._document(session, store_id, file_id)
            doc.attributes, doc.updated_at = attributes, utcnow()
            session.commit()
            return document_view(doc)

    def delete_file(self, store_id: str, owner: str | None, file_id: str) -> dict[str, Any]:
        """The document and its chunks, at once; the File itself stays."""
        with self._session() as session:
            self._collection(session, store_id, owner)
            doc = self._document(session, store_id, file_id)
            job_id = doc.job_id if doc.status == IN_PROGRESS else None
            session.execute(delete(CollectionChunk).where(CollectionChunk.document_id == doc.id))
            session.delete(doc)
            session.commit()
        if job_id:
            self._stop_if_orphaned(job_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    def _stop_if_orphaned(self, job_id: str) -> None:
        with self._session() as session:
            left = session.scalar(select(func.count()).select_from(CollectionDocument).where(
                CollectionDocument.job_id == job_id, CollectionDocument.status == IN_PROGRESS))
        if not left:
            self._stop(job_id)

    def file_content(self, store_id: str, owner: str | None, file_id: str) -> dict[str, Any]:
        """The document's text as indexed: its chunks in order, the overlap between neighbours left out."""
        with self._session() as session:
            self._collection(session, store_id, owner)
            doc = self._document(session, store_id, file_id)
            row = session.get(Collection, store_id)
            digest = row.model_digest if row else ""
            chunks = session.execute(select(CollectionChunk.text, CollectionChunk.start, CollectionChunk.end)
                                     .where(CollectionChunk.document_id == doc.id,
                                            CollectionChunk.model_digest == digest)
                                     .order_by(CollectionChunk.seq)).all()
        data, reached = [], 0
        for text, start, end in chunks:
            if end <= reached:
                continue
            data.append({"type": "text", "text": text[max(0, reached - start):] if start < reached else text})
            reached = end
        return {"object": "vector_store.file_content.page", "data": data, "has_more": False, "next_page": None}

    # -- batches ----------------------------------------------------------------------------------------

    def _batch(self, session: Session, store_id: str, batch_id: str) -> CollectionBatch:
        row = session.get(CollectionBatch, batch_id)
        if row is None or row.collection_id != store_id:
            raise NotFound(f"No file batch found with id '{batch_id}' in vector store '{store_id}'.", param="batch_id")
        return row

    def get_batch(self, store_id: str, owner: str | None, batch_id: str) -> dict[str, Any]:
        with self._session() as session:
            self._collection(session, store_id, owner)
            batch = self._batch(session, store_id, batch_id)
            settle(session, store_id)
            session.commit()
            counts = self._counts(session, store_id, batch_id)
            status = (CANCELLED if batch.cancelled_at else IN_PROGRESS if counts["in_progress"]
                      else FAILED if counts["total"] and counts["failed"] == counts["total"] else COMPLETED)
            return {"id": batch.id, "object": "vector_store.files_batch", "created_at": epoch(batch.created_at),
                    "vector_store_id": store_id, "status": status, "file_counts": counts}

    def cancel_batch(self, store_id: str, owner: str | None, batch_id: str) -> dict[str, Any]:
        """Stop the batch's unfinished files: they end ``cancelled`` (their chunks, if any, stay as they were)."""
        with self._session() as session:
            self._collection(session, store_id, owner)
            batch = self._batch(session, store_id, batch_id)
            if batch.cancelled_at is None:
                batch.cancelled_at = utcnow()
            session.execute(update(CollectionDocument).where(
                CollectionDocument.batch_id == batch_id, CollectionDocument.status == IN_PROGRESS,
            ).values(status=CANCELLED, job_id=None, updated_at=utcnow()))
            session.commit()
            job_id = batch.job_id
        if job_id:
            self._stop_if_orphaned(job_id)
        return self.get_batch(store_id, owner, batch_id)

    # -- CLI sync ---------------------------------------------------------------------------------------

    def sync(self, store_id: str, owner: str | None, *, mode: str, documents: builtins.list[SyncDocument],
             quota: Principal | None = None) -> dict[str, Any]:
        """Bring the store to a folder's state (``corral collection sync``): documents whose bytes are indexed
        already are skipped; new and changed ones are indexed, as one job, once their Files are uploaded; with
        ``full``, documents gone from the folder are deleted.  A first call without ``file_id`` for a changed
        document changes nothing and answers which ones the client must upload (``needed``)."""
        if mode not in ("incremental", "full"):
            raise BadRequest("mode must be incremental or full", param="mode")
        if len(documents) > MAX_SYNC_DOCUMENTS:
            raise BadRequest(f"a sync takes at most {MAX_SYNC_DOCUMENTS} documents", param="documents")
        seen: set[str] = set()
        for doc in documents:
            if doc.source_id in seen:
                raise BadRequest(f"source_id {doc.source_id!r} is given twice", param="documents")
            seen.add(doc.source_id)
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            self._model(row.model, quota)
            if row.reembed_job:
                raise Conflict(f"vector store {store_id} is being re-embedded; sync it when that job is done")
            current = {d.source_id: (d.sha256, d.status, d.chunk_tokens, d.chunk_overlap, d.attributes)
                       for d in session.execute(select(
                           CollectionDocument.source_id, CollectionDocument.sha256, CollectionDocument.status,
                           CollectionDocument.chunk_tokens, CollectionDocument.chunk_overlap,
                           CollectionDocument.attributes).where(CollectionDocument.collection_id == store_id))}
            chunking = Chunking(row.chunk_tokens, row.chunk_overlap)
            for file_id in {d.file_id for d in documents if d.file_id}:
                self._stored_file(session, file_id, owner)
        needed, skipped, entries, relabel = [], 0, [], []
        for doc in documents:
            known = current.get(doc.source_id)
            same = known is not None and known[2:4] == (chunking.max_tokens, chunking.overlap)
            if known and same and known[0] == doc.sha256 and known[1] == COMPLETED:
                skipped += 1
                if doc.attributes is not None and doc.attributes != known[4]:
                    relabel.append(doc)
            elif doc.file_id is None:
                needed.append(doc.source_id)
            else:
                entries.append(_Entry(doc.source_id, doc.file_id, doc.sha256, doc.attributes, chunking,
                                      set_attributes=doc.attributes is not None))
        gone = sorted(set(current) - seen) if mode == "full" else []
        report: dict[str, Any] = {
            "object": "vector_store.sync", "vector_store_id": store_id, "mode": mode,
            "added": sum(1 for e in entries if e.source_id not in current),
            "updated": sum(1 for e in entries if e.source_id in current), "skipped": skipped,
            "deleted": len(gone), "needed": needed, "job_id": None,
        }
        if needed:
            report.update(status="needs_upload", added=0, updated=0, deleted=0)
            return report
        with self._session() as session:
            for doc in relabel:
                session.execute(update(CollectionDocument).where(
                    CollectionDocument.collection_id == store_id, CollectionDocument.source_id == doc.source_id,
                ).values(attributes=doc.attributes, updated_at=utcnow()))
            session.commit()
        report["job_id"] = self._index(store_id, owner, entries, quota=quota, delete_sources=gone) if entries or gone else None
        report["status"] = IN_PROGRESS if entries else COMPLETED
        return report

    def reembed(self, store_id: str, owner: str | None, model: str, quota: Principal | None = None) -> dict[str, Any]:
        """Embed every indexed document again with ``model``, beside the current vectors; when that job is done
        the store switches to the new vectors in one transaction (jobs/collection_index.py ``finish_reembed``).
        Searches meanwhile use the current ones; syncs wait (409) until the switch."""
        record = self._model(model, quota)
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            if row.reembed_job:
                raise Conflict(f"vector store {store_id} is being re-embedded already (job {row.reembed_job})")
            if session.scalar(select(func.count()).select_from(CollectionDocument).where(
                    CollectionDocument.collection_id == store_id, CollectionDocument.status == IN_PROGRESS)):
                raise Conflict(f"vector store {store_id} has documents being indexed; re-embed it when they are done")
            chunking = resolve_chunking(record, Chunking(row.chunk_tokens, row.chunk_overlap)
                                        if row.chunk_tokens <= context_length(record) else None)
            docs = session.execute(select(CollectionDocument.id, CollectionDocument.file_id, CollectionDocument.filename)
                                   .where(CollectionDocument.collection_id == store_id,
                                          CollectionDocument.status == COMPLETED)
                                   .order_by(CollectionDocument.id)).all()
            if not docs:  # nothing embedded: the store simply takes the new model
                row.model, row.model_digest = model, record.model_digest
                row.chunk_tokens, row.chunk_overlap = chunking.max_tokens, chunking.overlap
                session.commit()
                return {"object": "vector_store.reembed", "vector_store_id": store_id, "model": model, "job_id": None}
        names = {}
        with self._session() as session:
            for file_id in {f for _, f, _ in docs if f}:
                names[file_id] = session.scalar(select(StoredFile.filename).where(StoredFile.id == file_id)) or ""
        bodies = [(f"doc-{doc_id}", {
            "collection_id": store_id, "document_id": doc_id, "file_id": file_id, "filename": names.get(file_id or "", ""),
            "chunk_tokens": chunking.max_tokens, "chunk_overlap": chunking.overlap,
            "model_digest": record.model_digest, "reembed": True,
        }) for doc_id, file_id, _ in docs]

        def prepare(session: Session, job_id: str) -> None:
            session.execute(update(Collection).where(Collection.id == store_id).values(
                next_model=model, next_digest=record.model_digest, reembed_job=job_id))

        view = self.jobs.submit(kind=INDEX_KIND, model=model, items=bodies, owner=owner, quota=quota,
                                chunk_size=INDEX_CHUNK_SIZE, metadata={"vector_store_id": store_id, "reembed": True},
                                prepare=prepare)
        return {"object": "vector_store.reembed", "vector_store_id": store_id, "model": model, "job_id": view["id"]}

    # -- indexing ---------------------------------------------------------------------------------------

    def _index(self, store_id: str, owner: str | None, entries: builtins.list[_Entry], *, quota: Principal | None,
               batch_id: str | None = None, delete_sources: builtins.list[str] | None = None) -> str | None:
        """Write the entries' document rows (``in_progress``, naming the new job) and the job that indexes them in
        one transaction; ``delete_sources`` go in the same one.  Returns the job id (None: nothing to index)."""
        with self._session() as session:
            row = self._collection(session, store_id, owner)
            model, digest = row.model, row.model_digest
        bodies: builtins.list[tuple[str, dict[str, Any]]] = []

        def prepare(session: Session, job_id: str) -> None:
            now = utcnow()
            if batch_id is not None:  # in the job's transaction: a refused submission leaves no empty batch behind
                session.add(CollectionBatch(id=batch_id, collection_id=store_id, job_id=job_id or None))
                session.flush()
            if delete_sources:
                for start in range(0, len(delete_sources), 500):
                    ids = select(CollectionDocument.id).where(
                        CollectionDocument.collection_id == store_id,
                        CollectionDocument.source_id.in_(delete_sources[start:start + 500]))
                    session.execute(delete(CollectionChunk).where(CollectionChunk.document_id.in_(ids)))
                    session.execute(delete(CollectionDocument).where(
                        CollectionDocument.collection_id == store_id,
                        CollectionDocument.source_id.in_(delete_sources[start:start + 500])))
            existing = {d.source_id: d for d in session.scalars(select(CollectionDocument).where(
                CollectionDocument.collection_id == store_id,
                CollectionDocument.source_id.in_([e.source_id for e in entries])))} if len(entries) <= 500 else {
                d.source_id: d for d in session.scalars(select(CollectionDocument).where(
                    CollectionDocument.collection_id == store_id))}
            for entry in entries:
                doc = existing.get(entry.source_id)
                filename = session.scalar(select(StoredFile.filename).where(StoredFile.id == entry.file_id)) or ""
                if doc is None:
                    doc = CollectionDocument(collection_id=store_id, source_id=entry.source_id, usage_bytes=0,
                                             chunk_count=0, created_at=now, attributes=entry.attributes)
                    session.add(doc)
                elif entry.set_attributes:
                    doc.attributes = entry.attributes
                doc.file_id, doc.filename = entry.file_id, filename if entry.source_id == entry.file_id else entry.source_id
                doc.status, doc.last_error, doc.job_id, doc.updated_at = IN_PROGRESS, None, job_id, now
                doc.chunk_tokens, doc.chunk_overlap = entry.chunking.max_tokens, entry.chunking.overlap
                if batch_id is not None:
                    doc.batch_id = batch_id
                session.flush()
                bodies.append((f"doc-{doc.id}", {
                    "collection_id": store_id, "document_id": doc.id, "file_id": entry.file_id,
                    "filename": filename, "chunk_tokens": entry.chunking.max_tokens,
                    "chunk_overlap": entry.chunking.overlap, "model_digest": digest,
                }))

        if not entries:  # a full sync that only deletes
            with self._session() as session:
                prepare(session, "")
                session.commit()
            return None
        view = self.jobs.submit(
            kind=INDEX_KIND, model=model, items=_lazy(bodies), owner=owner, quota=quota,
            chunk_size=INDEX_CHUNK_SIZE, metadata={"vector_store_id": store_id}, prepare=prepare,
        )
        return str(view["id"])


@dataclass(frozen=True)
class _Entry:
    """A document to (re)index: its source id, the File with its bytes, and how to chunk it."""

    source_id: str
    file_id: str
    sha256: str | None
    attributes: dict[str, Any] | None
    chunking: Chunking
    set_attributes: bool


def _lazy(bodies: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The job's items, read only once ``prepare`` has filled ``bodies`` inside the submission's transaction."""
    yield from bodies
