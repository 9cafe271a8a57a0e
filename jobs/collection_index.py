"""Writing a collection's index: what an ``index`` job's worker applies, and how a document's state is read.

A worker indexes a document (workers/indexing.py) and calls :func:`apply_document` in the same transaction as
the item's result (``transitions.write_result``, which holds only while the worker's claim does): the
document's chunks are deleted and the new ones inserted, with its status, in that one transaction.  The
document must still name the item's job: a document deleted meanwhile, or taken over by a newer sync, refuses
the write (its item still succeeds; its result is only not applied).

:func:`settle` is how a document whose item ended without applying anything (failed after its retries by the
reconciler, cancelled with its job) reaches a terminal state: it is run whenever a store's documents are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, cast, delete, func, insert, select, update
from sqlalchemy.orm import Session

from corral.errors import BadRequest
from corral.modelstore.store import ModelRecord
from corral.wire.vector_stores import Chunking
from jobs import collection_search
from jobs.files import epoch
from jobs.models import (
    Collection,
    CollectionChunk,
    CollectionDocument,
    FilePart,
    Item,
    ItemState,
    Job,
    JobStatus,
    StoredFile,
    utcnow,
)

INDEX_KIND = "index"  # the job kind of a collection's indexing: one item per document
AUTO = Chunking(800, 400)  # OpenAI's "auto": 800 tokens a chunk, 400 shared with the previous one
MAX_DOCUMENT_CHARS = 8_000_000  # about 2 M tokens: a document past it is refused, not half indexed


@dataclass(frozen=True)
class IndexedChunk:
    """One chunk as the worker cut it: its text, its place in the document's text, its token count."""

    seq: int
    text: str
    start: int
    end: int
    tokens: int


def context_length(record: ModelRecord) -> int:
    """The longest input the model embeds whole (its training context), in tokens; 512 when unknown."""
    info = record.config.get("model_info") or {}
    family = str(record.config.get("model_family") or info.get("general.architecture") or "")
    try:
        return int(info.get(f"{family}.context_length") or 512)
    except (TypeError, ValueError):
        return 512


def resolve_chunking(record: ModelRecord, chunking: Chunking | None) -> Chunking:
    """The chunking a document gets: ``auto`` is OpenAI's 800/400, cut to what the model embeds whole (a chunk
    longer than its context would lose its end); a static strategy longer than that is refused."""
    limit = context_length(record)
    if chunking is None:
        size = min(AUTO.max_tokens, limit)
        return Chunking(size, min(AUTO.overlap, size // 2))
    if chunking.max_tokens > limit:
        raise BadRequest(
            f"chunking_strategy.static.max_chunk_size_tokens {chunking.max_tokens} is more than the model "
            f"embeds at once ({limit} tokens)", param="chunking_strategy")
    return chunking


def chunking_view(tokens: int, overlap: int) -> dict[str, Any]:
    """A resolved chunking as OpenAI's responses give it (``auto`` is never echoed: its numbers are)."""
    return {"type": "static", "static": {"max_chunk_size_tokens": tokens, "chunk_overlap_tokens": overlap}}


def document_view(doc: CollectionDocument) -> dict[str, Any]:
    """OpenAI's ``vector_store.file`` for a document (its id is its File's)."""
    return {
        "id": doc.file_id, "object": "vector_store.file", "usage_bytes": int(doc.usage_bytes or 0),
        "created_at": epoch(doc.created_at), "vector_store_id": doc.collection_id, "status": doc.status,
        "last_error": doc.last_error, "attributes": doc.attributes,
        "chunking_strategy": chunking_view(doc.chunk_tokens, doc.chunk_overlap),
        # corral's: where the document came from (a path for `corral collection sync`) and what it became
        "source_id": doc.source_id, "filename": doc.filename, "chunks": doc.chunk_count,
    }


def document_source(session: Session, file_id: str) -> tuple[str, bytes] | None:
    """(file name, bytes) of the File a document is read from; None when it was deleted."""
    stored = session.get(StoredFile, file_id)
    if stored is None or stored.deleted_at is not None:
        return None
    parts = session.scalars(select(FilePart.data).where(FilePart.file_id == file_id).order_by(FilePart.seq))
    return stored.filename, b"".join(parts)


def stored_chunks(session: Session, document_id: int) -> tuple[str, list[IndexedChunk]] | None:
    """(sha256, chunks) of what the document holds now under its collection's current model; None when it holds
    nothing.  A re-embed falls back to these texts when the document's File was deleted since it was indexed."""
    doc = session.get(CollectionDocument, document_id)
    collection = session.get(Collection, doc.collection_id) if doc is not None else None
    if doc is None or collection is None:
        return None
    rows = session.execute(select(CollectionChunk.seq, CollectionChunk.text, CollectionChunk.start,
                                  CollectionChunk.end, CollectionChunk.tokens)
                           .where(CollectionChunk.document_id == document_id,
                                  CollectionChunk.model_digest == collection.model_digest)
                           .order_by(CollectionChunk.seq)).all()
    if not rows:
        return None
    return doc.sha256 or "", [IndexedChunk(*row) for row in rows]


def _current(session: Session, job_id: str, document_id: int, reembed: bool = False) -> CollectionDocument | None:
    """The document, locked, if it is still this job's to write: its sync's, or its collection's re-embed's."""
    doc = session.scalar(select(CollectionDocument).where(CollectionDocument.id == document_id).with_for_update())
    if doc is None:
        return None
    if reembed:
        collection = session.get(Collection, doc.collection_id)
        return doc if collection is not None and collection.reembed_job == job_id else None
    if doc.job_id != job_id or doc.status != "in_progress":
        return None
    return doc


def apply_document(
    session: Session, *, job_id: str, document_id: int, model_digest: str, sha256: str,
    chunks: list[IndexedChunk], vectors: bytes, dims: int, reembed: bool = False,
) -> bool:
    """Replace the document's chunks of ``model_digest`` with ``chunks`` (``vectors``: their float32 rows) and
    mark it completed, in the caller's transaction; False (nothing written) when the document is no longer this
    job's.  A re-embed's vectors (another digest) go beside the current ones and leave the status alone."""
    doc = _current(session, job_id, document_id, reembed)
    if doc is None:
        return False
    collection = session.get(Collection, doc.collection_id)
    if collection is None or model_digest not in (collection.model_digest, collection.next_digest):
        return False
    session.execute(delete(CollectionChunk).where(CollectionChunk.document_id == document_id,
                                                  CollectionChunk.model_digest == model_digest))
    width = 4 * dims
    rows = [{"collection_id": doc.collection_id, "document_id": document_id, "model_digest": model_digest,
             "seq": c.seq, "text": c.text, "start": c.start, "end": c.end, "tokens": c.tokens,
             "embedding": vectors[i * width:(i + 1) * width]} for i, c in enumerate(chunks)]
    if rows:
        session.execute(insert(CollectionChunk), rows)
        collection_search.index_document(session, document_id, model_digest)  # the vector index, in this transaction
    if reembed:
        return True  # the document stays as it is until the switch (finish_reembed)
    text_bytes = sum(len(c.text.encode("utf-8")) for c in chunks)
    session.execute(update(CollectionDocument).where(CollectionDocument.id == document_id).values(
        status="completed", last_error=None, sha256=sha256, chunk_count=len(chunks),
        usage_bytes=text_bytes + len(vectors), updated_at=utcnow(),
    ))
    return True


def fail_document(session: Session, *, job_id: str, document_id: int, code: str, message: str,
                  reembed: bool = False) -> bool:
    """The document could not be indexed (``code``: OpenAI's ``invalid_file``, ``unsupported_file`` or
    ``server_error``): it ends ``failed`` with the reason, and keeps the chunks it had, if any (until a re-embed
    switches models: then it has none of the new model's)."""
    doc = _current(session, job_id, document_id, reembed)
    if doc is None:
        return False
    doc.status, doc.last_error, doc.updated_at = "failed", {"code": code, "message": message[:1000]}, utcnow()
    return True


def settle(session: Session, collection_id: str) -> int:
    """Give a terminal state to the collection's in-progress documents whose item has ended without applying
    (failed by the reconciler after its retries, cancelled, or gone with its job), and finish a re-embed whose
    last items ended elsewhere; returns how many documents changed."""
    finish_reembed(session, collection_id)
    rows = session.execute(
        select(CollectionDocument.id, Item.state, Item.error, Job.status)
        .outerjoin(Job, Job.id == CollectionDocument.job_id)
        .outerjoin(Item, and_(Item.job_id == CollectionDocument.job_id,
                              Item.custom_id == "doc-" + _text_id(CollectionDocument.id)))
        .where(CollectionDocument.collection_id == collection_id, CollectionDocument.status == "in_progress")
    ).all()
    changed = 0
    now = utcnow()
    for doc_id, state, error, job_status in rows:
        if state in (ItemState.PENDING, ItemState.RUNNING) and job_status not in JobStatus.TERMINAL:
            continue
        if state == ItemState.SUCCEEDED:  # applied with the item, unless refused: the store's model changed meanwhile
            values: dict[str, Any] = {"status": "failed", "last_error": {
                "code": "server_error", "message": "the store's model changed while the document was indexed"}}
        elif state == ItemState.CANCELLED or job_status in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            values = {"status": "cancelled"}
        else:
            values = {"status": "failed", "last_error": {
                "code": "server_error", "message": (error or "the document's indexing ended without a result")[:1000]}}
        session.execute(update(CollectionDocument).where(CollectionDocument.id == doc_id,
                                                         CollectionDocument.status == "in_progress")
                        .values(**values, updated_at=now))
        changed += 1
    return changed


def _text_id(column: Any) -> Any:
    return cast(column, String)


def finish_reembed(session: Session, collection_id: str) -> bool:
    """Switch a collection to its re-embed's model once that job has no open item: the new model and digest, the
    old vectors deleted, in one transaction (a search before it ranks the old vectors, after it the new ones).
    Documents without vectors of the new model (their item failed) end ``failed``.  True when it switched."""
    collection = session.scalar(select(Collection).where(Collection.id == collection_id).with_for_update())
    if collection is None or not collection.reembed_job or not collection.next_digest:
        return False
    job_id, new, old = collection.reembed_job, collection.next_digest, collection.model_digest
    open_items = session.scalar(select(func.count()).select_from(Item).where(
        Item.job_id == job_id, Item.state.in_(ItemState.OPEN)))
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if open_items and status not in JobStatus.TERMINAL:
        return False
    embedded = select(CollectionChunk.document_id).where(CollectionChunk.collection_id == collection_id,
                                                         CollectionChunk.model_digest == new)
    session.execute(update(CollectionDocument).where(
        CollectionDocument.collection_id == collection_id, CollectionDocument.status == "completed",
        CollectionDocument.chunk_count > 0, CollectionDocument.id.not_in(embedded),
    ).values(status="failed", last_error={"code": "server_error", "message": "re-embedding this document failed"},
             updated_at=utcnow()))
    session.execute(delete(CollectionChunk).where(CollectionChunk.collection_id == collection_id,
                                                  CollectionChunk.model_digest == old))
    collection_search.forget(session, collection_id, old)  # the old model's blocks or HNSW index
    collection.model, collection.model_digest = collection.next_model or collection.model, new
    collection.next_model = collection.next_digest = collection.reembed_job = None
    return True
