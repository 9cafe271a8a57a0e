"""SQL tables of the batch-job domain: jobs, their items (one per input line) and the chunks that run them,
and the OpenAI Files API's files (stored in SQL in 1 MiB parts, so every API replica can serve them).

SQL is the source of truth.  A Celery message only says "work on chunk X"; the chunk row says which items,
who runs it and since when, so a lost message, a killed worker or a flushed Redis can always be repaired from
here (see :mod:`jobs.reconcile`).  The state names are the constants of :mod:`jobs.states`; :mod:`jobs.transitions` is the
only code that changes them.  Constraint names follow a naming convention so Alembic migrations are
stable across SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# re-exported: callers take the state names from here, beside the tables
from jobs.states import ChunkState as ChunkState
from jobs.states import ItemState as ItemState
from jobs.states import JobStatus as JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Job(Base):
    """One submitted batch: a kind, a model, shared options, and N items."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(400))
    model_digest: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_size: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The end of an OpenAI batch's completion window: the reconciler expires what is unfinished by then.
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    # Where the job's end is announced (jobs/webhooks.py), and the secret its deliveries are signed with.
    webhook_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # Serve repeats of deterministic requests from the result cache, and add this job's results to it.
    cache: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # Scheduling (jobs/dispatch.py): each point moves the job's deadline an hour earlier, -10 to 10.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class WebhookDelivery(Base):
    """One event to deliver to a job's webhook: retried with backoff until it is accepted or a day has passed."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Chunk(Base):
    """A slice of a job's items that one Celery task runs; the unit of redelivery and recovery."""

    __tablename__ = "job_chunks"
    __table_args__ = (Index("ix_job_chunks_state_model", "state", "model_digest"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    model_digest: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.QUEUED)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempt: Mapped[str | None] = mapped_column(String(40), nullable=True)
    enqueued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Queued but not yet sent: the dispatcher (jobs/dispatch.py) releases it when its turn comes.
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class Item(Base):
    """One input line and, once run, its result."""

    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_job_items_job_id_seq"),
        UniqueConstraint("job_id", "custom_id", name="uq_job_items_job_id_custom_id"),
        # covering for job progress (item_counts): counts per state and token sums never read the rows
        Index("ix_job_items_progress", "job_id", "state", "prompt_tokens", "completion_tokens"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    # No foreign keys on this, the one table that takes a million rows in one upload: their per-row checks were
    # two fifths of PostgreSQL's work in a COPY of items (migration 0010).  Items are written only with their
    # job and chunks, in the submission's transaction, and deleted before them (JobService.delete).
    job_id: Mapped[str] = mapped_column(String(40))
    chunk_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    seq: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(512), nullable=True)
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=ItemState.PENDING)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim: Mapped[str | None] = mapped_column(String(40), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())  # from the result cache


class CachedResult(Base):
    """The result of a deterministic request (jobs/dedup.py ``request_key``), for jobs submitted with ``cache``."""

    __tablename__ = "result_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    output: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


FILE_PURPOSES = ("batch", "batch_output", "assistants", "fine-tune", "vision", "user_data", "evals")


class StoredFile(Base):
    """An OpenAI file: an upload (content in :class:`FilePart` rows) or a batch's output/error file, whose
    content is rendered from the job's items when read (``job_id`` + ``role`` set)."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("job_id", "role", name="uq_files_job_id_role"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(400))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True)
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)


class FilePart(Base):
    """One piece of an uploaded file's bytes, in order."""

    __tablename__ = "file_parts"

    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiKey(Base):
    """An API key: only its sha256 is stored (keys are 256-bit random, so a fast hash is enough)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # jobs/keys.py KeyLimits


class KeyUsage(Base):
    """A key's sync traffic on one day (UTC): batch items are counted from the items themselves."""

    __tablename__ = "key_usage"

    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    generated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    embed_inputs: Mapped[int] = mapped_column(BigInteger, default=0)


class StoredResponse(Base):
    """A ``/v1/responses`` response kept with ``store: true`` (jobs/responses.py): the Response object, the input
    items it was given (its own, not its chain's), and the response it continues; gone after ``expires_at``."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    model: Mapped[str] = mapped_column(String(400))
    status: Mapped[str] = mapped_column(String(16))
    previous_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    input_items: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Collection(Base):
    """A named corpus kept in sync (an OpenAI vector store, ``vs_...``): the embedding model its vectors come
    from, by manifest digest, and how its documents are chunked (jobs/collections.py).

    A re-embed builds vectors with ``next_model`` beside the current ones (the job ``reembed_job``) and switches
    ``model``/``model_digest`` to them in one transaction when that job is done."""

    __tablename__ = "collections"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(400), default="")
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str] = mapped_column(String(400))
    model_digest: Mapped[str] = mapped_column(String(64))
    chunk_tokens: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON, nullable=True)
    expires_days: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True, index=True)
    last_active_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    next_model: Mapped[str | None] = mapped_column(String(400), nullable=True)
    next_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reembed_job: Mapped[str | None] = mapped_column(String(40), nullable=True)


class CollectionDocument(Base):
    """One document of a collection (an OpenAI ``vector_store.file``), named by a stable ``source_id``: the File
    id for the API, the relative path for ``corral collection sync``.  This row is the record; its chunks are
    derived from it.  ``item_id`` is the job item indexing it now: only that item's result is applied, so an
    older sync still running when a newer one starts cannot write over it."""

    __tablename__ = "collection_documents"
    __table_args__ = (
        UniqueConstraint("collection_id", "source_id", name="uq_collection_documents_collection_id_source_id"),
        Index("ix_collection_documents_status", "collection_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    collection_id: Mapped[str] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    source_id: Mapped[str] = mapped_column(String(1000))
    file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    filename: Mapped[str] = mapped_column(String(1000), default="")
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of the bytes indexed (or being indexed)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16))  # in_progress, completed, failed, cancelled
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    chunk_tokens: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    item_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    batch_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class CollectionChunk(Base):
    """A chunk of a document: its text, where it lies in the document's text, and its float32 vector (one of the
    model ``model_digest``: a re-embed writes its vectors beside the current ones).  Keyword search indexes
    ``text`` (FTS5 on SQLite, a tsvector on PostgreSQL: migration 0012)."""

    __tablename__ = "collection_chunks"
    __table_args__ = (Index("ix_collection_chunks_collection", "collection_id", "model_digest"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    collection_id: Mapped[str] = mapped_column(String(40))
    document_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("collection_documents.id", ondelete="CASCADE"), index=True)
    model_digest: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)


class CollectionBatch(Base):
    """An OpenAI ``vector_store.files_batch``: the files it attached (their documents carry ``batch_id``)."""

    __tablename__ = "collection_batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    collection_id: Mapped[str] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(nullable=True)
