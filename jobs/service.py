"""Batch jobs: submit, fan out, report, cancel, retry, delete.

Submission writes the job, its items and its chunks in one transaction, commits, and only then enqueues one
Celery message per chunk carrying nothing but the chunk id.  A validation error anywhere in the input rolls the
whole transaction back: nothing half-created.  Job state is always computed from the item rows.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import redis
from sqlalchemy import (
    Integer,
    cast,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from corral.broker import UNREACHABLE, Broker
from corral.errors import BadRequest, Conflict, CorralError, Forbidden, NotFound, RateLimited
from corral.images import check_images
from corral.modelstore.capabilities import kind_refusal
from corral.modelstore.store import ModelRecord, ModelStore
from corral.protocol import KEY_PREFIX, job_cancel_key
from corral.settings import Settings
from corral.timefmt import duration_seconds, rfc3339
from corral.wire.jobs import JOB_KINDS
from corral.wire.ollama import check_context
from corral.wire.rerank import rerank_reply
from jobs import dedup, dispatch, dryrun, grouping, readstates, transitions, webhooks
from jobs.collection_index import INDEX_KIND
from jobs.db import poll, reason, sessions, unreachable
from jobs.ids import chunk_id_maker, new_id
from jobs.keys import Principal
from jobs.models import Chunk, ChunkState, Item, ItemState, Job, JobStatus, as_utc, utcnow
from jobs.search import hydrate, top_k
from jobs.status import Counts, chunks_ahead, counted_exactly, item_counts, read_status
from jobs.stopping import stop_jobs
from jobs.transitions import requeue_failed, stop_job

log = logging.getLogger(__name__)
ANALYZE_FROM = 50_000  # items in one upload after which PostgreSQL's statistics are refreshed
COUNTS_CACHE_MS = 2000


@dataclass
class JobService:
    """The job operations the HTTP API (and through it the CLI) offers."""

    settings: Settings
    store: ModelStore
    broker: Broker


    def _session(self) -> Session:
        return sessions(self.settings)()

    # -- submission -------------------------------------------------------------------------------------

    def submit(
        self,
        *,
        kind: str,
        model: str,
        items: Iterable[tuple[str | None, dict[str, Any]]],
        options: dict[str, Any] | None = None,
        chunk_size: int | None = None,
        metadata: dict[str, Any] | None = None,
        owner: str | None = None,
        job_id: str | None = None,
        expires_at: datetime | None = None,
        quota: Principal | None = None,
        webhook_url: str | None = None,
        cache: bool = False,
        completion_window: str | None = None,
        priority: int = 0,
        prepare: Callable[[Session, str], None] | None = None,
    ) -> dict[str, Any]:
        """Write the job, its items and chunks in one transaction, commit, then enqueue the chunks.

        ``prepare(session, job_id)`` runs in that transaction before ``items`` is read: a collection writes the
        document rows its ``index`` items name there (jobs/collections.py), so both commit or neither does.

        ``job_id`` lets the OpenAI Batch API give the job its ``batch_...`` id; ``expires_at`` is its window's
        end (the reconciler expires what is unfinished by then).  ``cache``: take results of deterministic
        requests from the result cache, and add this job's to it (jobs/dedup.py).  ``completion_window`` (``1h``)
        and ``priority`` order its chunks among other jobs' (jobs/dispatch.py); it expires unfinished at the
        window's end.
        """
        record = self._model_for(kind, model, quota)
        if not -10 <= priority <= 10:
            raise BadRequest("priority must be between -10 and 10", param="priority")
        if completion_window is not None:
            try:
                expires_at = utcnow() + timedelta(seconds=duration_seconds(completion_window))
            except ValueError as exc:
                raise BadRequest(f"completion_window {exc}", param="completion_window") from exc
        size = chunk_size or self.settings.chunk_size
        if not 1 <= size <= 10_000:
            raise BadRequest("chunk_size must be between 1 and 10000")
        job_id = job_id or new_id("job")
        # The job's own webhook gets a new secret, returned once with this answer; the server's default its own.
        secret = webhooks.new_secret() if webhook_url else self.settings.webhook_secret
        webhook_url = (webhooks.check_url(webhook_url, self.settings.webhook_allow_networks) if webhook_url
                       else self.settings.webhook_url)
        with self._session() as session:
            session.add(
                Job(
                    id=job_id, kind=kind, model=model, model_digest=record.model_digest, options=options or {},
                    status=JobStatus.QUEUED, chunk_size=size, owner=owner, meta=metadata or {}, item_count=0,
                    expires_at=expires_at, webhook_url=webhook_url, webhook_secret=secret if webhook_url else None,
                    cache=cache, priority=priority,
                )
            )
            session.flush()
            if prepare is not None:
                prepare(session, job_id)
            writer = grouping.ChunkWriter(
                session, job_id, kind, record.model_digest, record.digest, size, options or {}, chunk_id_maker(),
                group=self.settings.prefix_grouping, cache_ttl=self.settings.result_cache_ttl if cache else 0,
                cache_scope=dedup.cache_scope(owner, self.settings.result_cache_shared),
            )
            window: list[grouping.Pending] = []
            per_window = grouping.window_size(size)
            count = 0
            with writer:
                for custom_id, body in items:
                    check_item(record, model, kind, body, count + 1)
                    window.append((count, custom_id, body))
                    count += 1
                    if len(window) >= per_window:
                        writer.write(window)
                        window = []
                if window:
                    writer.write(window)
            chunk_ids = writer.chunk_ids
            if count == 0:
                session.rollback()
                raise BadRequest("no items: the input is empty")
            most = quota.limits.max_queued_items if quota is not None else None
            if quota is not None and most is not None and owner is not None:
                queued = self._queued_items(session, owner)  # this job's items included: same transaction
                if queued > most:
                    session.rollback()  # refused whole: nothing of the job is stored
                    raise RateLimited(
                        f"the key '{quota.name}' may have at most {most} queued batch items; with this job's "
                        f"{count} it would have {queued}", retry_after=60)
            session.execute(update(Job).where(Job.id == job_id).values(item_count=count))
            if not chunk_ids:  # every item came from the result cache: nothing to run
                transitions.start_job(session, job_id)
                transitions.finish_job_if_done(session, job_id)
            # The answer is read in the transaction that stores the job: once it is committed, nothing may turn
            # the reply into an error, or a client's retry makes a second job.
            job = self._job(session, job_id, None)
            view = self._view(session, job, item_counts(session, job_id, job.status), self._queue_position(session, job))
            session.commit()
        if count >= ANALYZE_FROM:
            try:
                self._analyze()
            except DBAPIError as exc:  # statistics, not the job: it is stored and goes on
                log.warning("ANALYZE after job %s failed (%s)", job_id, reason(exc))
        try:
            self.send_next(record.model_digest)  # the chunks are held: the dispatcher sends them in turn
        except UNREACHABLE as exc:
            log.warning("job %s is stored but Redis is out of reach (%s); the reconciler sends its chunks when "
                        "it is back", job_id, exc)
        except DBAPIError as exc:
            log.warning("job %s is stored but the database failed after the commit (%s, %s); the reconciler "
                        "sends its chunks", job_id, reason(exc), "out of reach" if unreachable(exc) else "a query")
        if webhook_url and secret and secret != self.settings.webhook_secret:
            view["webhook"]["secret"] = secret  # shown this once: receivers verify signatures with it
        return view

    def _analyze(self) -> None:
        """Fresh planner statistics after a large upload on PostgreSQL: with the item count still that of the
        empty table, the planner sorted every remaining item for each page of results (an export of a million
        items took over ten minutes instead of seconds)."""
        with self._session() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("ANALYZE job_items"))
                session.commit()

    def send_next(self, model_digest: str) -> int:
        """Release held chunks of the model to its batch queue, in the dispatcher's order (jobs/dispatch.py)."""
        return dispatch.send_next(self._session, self.broker.celery, self.broker.redis, model_digest)

    def _model_for(self, kind: str, model: str, quota: Principal | None) -> ModelRecord:
        """The model a job of ``kind`` names, checked: it exists, the key may use it, it can do ``kind``."""
        if kind not in JOB_KINDS and kind != INDEX_KIND:  # index jobs: only a collection submits them
            raise BadRequest(f"kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        if not model:
            raise BadRequest("model is required")
        record = self.store.get(model)
        if quota is not None and not quota.limits.allows(model):
            raise Forbidden(f"model '{model}' is not allowed for the key '{quota.name}'")
        refusal = kind_refusal(record.capabilities, model, kind)
        if refusal:
            raise BadRequest(refusal)
        return record

    def dry_run(
        self, *, kind: str, model: str, items: Iterable[tuple[str | None, dict[str, Any]]],
        options: dict[str, Any] | None = None, quota: Principal | None = None,
        count: Callable[[str, builtins.list[dict[str, Any]]], builtins.list[int | None]],
        throughput: Callable[[str], tuple[float | None, int]],
    ) -> dict[str, Any]:
        """What a submission of these items would be (jobs/dryrun.py), with nothing stored or queued.
        ``count(digest, bodies)`` counts prompt tokens on a worker; ``throughput(digest)`` is the live workers'
        measured tokens/s on the model and how many have measured it."""
        record = self._model_for(kind, model, quota)
        rate, workers = throughput(record.model_digest)
        return dryrun.dry_run(
            self.settings, record, model, kind, options or {}, items,
            check=lambda body, n: check_item(record, model, kind, body, n),
            count=lambda bodies: count(record.model_digest, bodies), tokens_per_second=rate, workers=workers,
        )

    @staticmethod
    def _queued_items(session: Session, owner: str) -> int:
        """Items of the owner's jobs that are still to run (pending or running, as read: a stopped job's pending
        items are cancelled)."""
        query = (select(func.count(Item.id)).join(Job, Job.id == Item.job_id)
                 .where(Job.owner == owner, readstates.state_in(ItemState.OPEN)))
        return int(session.scalar(query) or 0)

    # -- reading ----------------------------------------------------------------------------------------

    def _job(self, session: Session, job_id: str, owner: str | None = None) -> Job:
        job = session.get(Job, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound(f"job '{job_id}' not found")
        return job

    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """A status poll (and the answer of a cancel or a retry): the job, its counts and its place in the queue
        in one statement (:func:`status_query`), so in one snapshot, read through :func:`jobs.db.poll` (no ping,
        BEGIN or ROLLBACK): one round trip to PostgreSQL, where a session's two reads took five.  A second only
        for a job with a webhook (its deliveries), or a large open job whose cached counts have lapsed."""
        return poll(self.settings, lambda session: self._polled(session, job_id, owner))

    def _polled(self, session: Session, job_id: str, owner: str | None) -> dict[str, Any]:
        read = read_status(session, job_id)
        if read is None or (owner is not None and read.job.owner != owner):
            raise NotFound(f"job '{job_id}' not found")
        return self._view(session, read.job, read.counts() or self._counts(session, read.job), read.queue_position)

    def list(self, *, status: str | None = None, limit: int = 20, offset: int = 0, owner: str | None = None) -> dict[str, Any]:
        if status is not None and status not in JobStatus.ALL:
            raise BadRequest(f"status must be one of {', '.join(JobStatus.ALL)}")
        limit = max(1, min(limit, 1000))
        with self._session() as session:
            query = select(Job).order_by(Job.created_at.desc(), Job.id.desc())
            if status:
                query = query.where(Job.status == status)
            if owner is not None:
                query = query.where(Job.owner == owner)
            jobs = list(session.scalars(query.offset(max(0, offset)).limit(limit + 1)))
            views = [self._view(session, j, self._counts(session, j), self._queue_position(session, j)) for j in jobs[:limit]]
            return {"jobs": views, "has_more": len(jobs) > limit}

    def _counts(self, session: Session, job: Job) -> Counts:
        """:func:`item_counts`, which reads every item's index entry: for a job of :data:`COUNTS_CACHED_FROM`
        items or more that is still open, at most once per :data:`COUNTS_CACHE_MS` (shared through Redis), so
        polling a million-item job stays cheap; a small or ended job's counts are always exact."""
        if counted_exactly(job):
            return item_counts(session, job.id, job.status)
        key = f"{KEY_PREFIX}counts:{job.id}"
        try:
            cached = self.broker.redis.get(key)
        except redis.RedisError:
            cached = None
        if cached is not None:
            counts, tokens = json.loads(cached)
            return counts, (int(tokens[0]), int(tokens[1]))
        counts, tokens = item_counts(session, job.id, job.status)
        with contextlib.suppress(redis.RedisError):
            self.broker.redis.set(key, json.dumps([counts, list(tokens)]), px=COUNTS_CACHE_MS)
        return counts, tokens

    @staticmethod
    def _view(session: Session, job: Job, counts_and_tokens: Counts, queue_position: int | None) -> dict[str, Any]:
        """The job as the API shows it, from its counts and its place in the queue as the caller read them (a
        submission reads exact counts inside its write transaction, which must not wait on Redis; a poll reads
        them in its one statement)."""
        counts, (prompt_tokens, completion_tokens) = counts_and_tokens
        done = sum(counts[state] for state in ItemState.FINISHED)
        total = job.item_count
        elapsed = None
        if job.started_at is not None:
            end = job.finished_at or utcnow()
            elapsed = max((as_utc(end) - as_utc(job.started_at)).total_seconds(), 1e-6)
        rate = done / elapsed if elapsed and done else None
        view: dict[str, Any] = {
            "id": job.id,
            "object": "job",
            "kind": job.kind,
            "model": job.model,
            "status": job.status,
            "options": job.options,
            "chunk_size": job.chunk_size,
            "metadata": job.meta,
            "owner": job.owner,
            "cache": job.cache,
            "priority": job.priority,
            "counts": {"total": total, **counts},
            "progress": round(done / total, 4) if total else 1.0,
            "tokens": {"prompt": int(prompt_tokens), "completion": int(completion_tokens)},
            "tokens_per_second": round(int(completion_tokens) / elapsed, 2) if elapsed else None,
            "items_per_second": round(rate, 3) if rate else None,
            "eta_seconds": round((total - done) / rate, 1) if rate and job.status == JobStatus.RUNNING else None,
            "queue_position": queue_position,
            "error": job.error,
            "created_at": rfc3339(as_utc(job.created_at)),
            "started_at": rfc3339(as_utc(job.started_at)) if job.started_at else None,
            "finished_at": rfc3339(as_utc(job.finished_at)) if job.finished_at else None,
            "expires_at": rfc3339(as_utc(job.expires_at)) if job.expires_at else None,
        }
        if job.webhook_url:
            view["webhook"] = {"url": job.webhook_url, "deliveries": webhooks.deliveries(session, job.id)}
        return view

    @staticmethod
    def _queue_position(session: Session, job: Job) -> int | None:
        """A queued job's :func:`chunks_ahead`; None for any other."""
        if job.status != JobStatus.QUEUED:
            return None
        return int(session.scalar(chunks_ahead(job.model_digest, job.created_at)) or 0)

    def throughput(self, job_id: str, owner: str | None = None, buckets: int = 48) -> builtins.list[tuple[float, float]]:
        """Items finished per second over the job's run so far, in ``buckets`` equal spans: (seconds since the
        start, rate) per span, counted in SQL so a 100,000-item job costs one grouped query."""
        with self._session() as session:
            job = self._job(session, job_id, owner)
            if job.started_at is None:
                return []
            start = as_utc(job.started_at)
            span = max((as_utc(job.finished_at or utcnow()) - start).total_seconds(), 1.0)
            width = span / buckets
            if session.get_bind().dialect.name == "sqlite":  # naive UTC text; julianday keeps the fractions
                seconds = (func.julianday(Item.finished_at) - func.julianday(start.replace(tzinfo=None))) * 86400.0
            else:
                seconds = func.extract("epoch", Item.finished_at) - start.timestamp()
            bucket = cast(seconds / width, Integer)
            rows = session.execute(
                select(bucket, func.count()).where(Item.job_id == job_id, Item.finished_at.is_not(None)).group_by(bucket)
            ).all()
            # a stopped job's items still stored pending finished (cancelled) when it stopped: the last span
            unsettled = readstates.unsettled_count(session, job_id) if job.status in JobStatus.STOPPED else 0
        counts = dict.fromkeys(range(buckets), 0)
        counts[buckets - 1] += unsettled
        for n, count in rows:
            index = min(max(int(n or 0), 0), buckets - 1)
            counts[index] += int(count)
        return [(round(n * width, 3), round(counts[n] / width, 3)) for n in range(buckets)]

    def results(
        self, job_id: str, *, offset: int = 0, limit: int | None = None, state: str | None = None,
        owner: str | None = None, include_input: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Result lines in input order (streamed from the database in pages)."""
        with self._session() as session:
            job = self._job(session, job_id, owner)
            model, kind, status = job.model, job.kind, job.status
        if state is not None and state not in ItemState.ALL:
            raise BadRequest(f"state must be one of {', '.join(ItemState.ALL)}")
        return self._result_lines(job_id, model, kind, offset, limit, state, include_input, status)

    def _result_lines(
        self, job_id: str, model: str, kind: str, offset: int, limit: int | None, state: str | None,
        include_input: bool = False, job_status: str = JobStatus.QUEUED,
    ) -> Iterator[dict[str, Any]]:
        remaining = limit if limit is not None else None
        last_seq = -1
        skip = max(0, offset)
        while remaining is None or remaining > 0:
            page = 500 if remaining is None else min(500, remaining)
            with self._session() as session:
                query = select(Item).where(Item.job_id == job_id, Item.seq > last_seq).order_by(Item.seq)
                if state:
                    query = query.where(Item.state.in_(readstates.stored_states([state], job_status)))
                if skip:
                    query = query.offset(skip)
                    skip = 0
                items = list(session.scalars(query.limit(page)))
            if not items:
                return
            for item in items:
                last_seq = item.seq
                yield result_line(item, model, kind, include_input, job_status)
            if remaining is not None:
                remaining -= len(items)

    def embed_job(self, job_id: str, owner: str | None = None) -> tuple[str, str]:
        """(model, digest) of an embedding job, for search; other kinds have no vectors to search."""
        with self._session() as session:
            job = self._job(session, job_id, owner)
            if job.kind != "embed":
                raise BadRequest(f"job '{job_id}' is a {job.kind} job; only embed jobs can be searched")
            return job.model, job.model_digest

    def search(self, job_id: str, query: np.ndarray, k: int) -> tuple[str, builtins.list[dict[str, Any]]]:
        """(backend, the top-k stored chunks by cosine similarity to ``query``): pgvector where the database has
        it, a numpy scan elsewhere (:mod:`jobs.search`).  The caller has checked the job with :meth:`embed_job`
        (it needs the job's model to embed the query anyway)."""
        backend, hits = top_k(self._session, job_id, query, max(1, min(k, 1000)))
        if not hits:
            return backend, []
        with self._session() as session:
            return backend, hydrate(session, hits)

    # -- control ----------------------------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """Items not yet run become cancelled, a running one stops between tokens, and the job's queued chunk
        messages leave the broker, so the jobs queued behind it do not wait for them."""
        with self._session() as session:
            digest = self._job(session, job_id, owner).model_digest
            stopped = stop_jobs(session, self.broker.redis, [(job_id, digest)],
                                lambda job: stop_job(session, job, JobStatus.CANCELLED))
        if stopped:
            self.send_next(digest)  # its place in the queue goes to the next job's chunks
        return self.get(job_id, owner)

    def retry(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """Re-run the failed items only, in new chunks."""
        with self._session() as session:
            job = self._job(session, job_id, owner)
            if job.status not in JobStatus.TERMINAL:
                raise Conflict(f"job '{job_id}' is {job.status}; retry it once it has ended")
            chunk_ids = requeue_failed(session, job, chunk_id_maker())
            if not chunk_ids:
                raise Conflict(f"job '{job_id}' has no failed items to retry")
            session.commit()
            digest = job.model_digest
        self.broker.redis.delete(job_cancel_key(job_id))
        self.send_next(digest)
        return self.get(job_id, owner)

    def delete(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        """The job and its results go; like a cancel, its running item stops and its queued messages leave."""
        with self._session() as session:
            digest = self._job(session, job_id, owner).model_digest
            stop_jobs(session, self.broker.redis, [(job_id, digest)], partial(transitions.delete_job, session))
        self.send_next(digest)
        return {"id": job_id, "object": "job", "deleted": True}

    def queue_overview(self, waiting: dict[str, int]) -> builtins.list[dict[str, Any]]:
        """Per model: interactive requests waiting (from Redis) and batch chunks queued/running (from SQL)."""
        with self._session() as session:
            rows = session.execute(
                select(Chunk.model_digest, Chunk.state, func.count())
                .where(Chunk.state != ChunkState.DONE)
                .group_by(Chunk.model_digest, Chunk.state)
            ).all()
        per: dict[str, dict[str, int]] = {}
        for digest, state, n in rows:
            per.setdefault(digest, {})[state] = int(n)
        out: builtins.list[dict[str, Any]] = []
        # one entry per model file, named as it first came (models created from it share its queues)
        for record in sorted(self.store.list(), key=lambda r: r.modified_at):
            d = record.model_digest
            if any(o["digest"] == d for o in out):
                continue
            out.append({
                "model": record.name.display,
                "digest": d,
                "interactive_waiting": waiting.get(d, 0),
                "batch_chunks_queued": per.get(d, {}).get(ChunkState.QUEUED, 0),
                "batch_chunks_running": per.get(d, {}).get(ChunkState.RUNNING, 0),
            })
        return out


def check_item(record: ModelRecord, model: str, kind: str, body: dict[str, Any], n: int) -> None:
    """What a job's item must satisfy beyond its schema (``n``: its line, for the message)."""
    if body.get("think") not in (None, False) and "thinking" not in record.capabilities:
        raise BadRequest(f'item {n}: "{model}" does not support thinking')
    images = body.get("images") or [i for m in body.get("messages") or () if "images" in m for i in m["images"]]
    if images:
        if "vision" not in record.capabilities:
            raise BadRequest(f"item {n}: {model} does not support vision: the item has images")
        try:
            check_images(images)
        except CorralError as exc:
            raise BadRequest(f"item {n}: {exc.message}") from exc
    if kind == "generate" and body.get("context"):
        try:
            check_context(body["context"], int(record.config.get("vocab_size") or 0))
        except BadRequest as exc:
            raise BadRequest(f"item {n}: {exc.message}") from exc


def result_line(
    item: Item, model: str, kind: str, include_input: bool = False, job_status: str = JobStatus.QUEUED
) -> dict[str, Any]:
    """One line of /api/jobs/{id}/results: the sync endpoint's non-stream body, or the error, plus the item's
    ``metadata`` when it had one and, on request, its ``input``; its state as read under a job of
    ``job_status`` (:mod:`jobs.readstates`)."""
    response = item.output
    if kind == "rerank" and item.state == ItemState.SUCCEEDED and item.output is not None:
        response = rerank_reply(model, item.output)
    if kind == "embed" and item.state == ItemState.SUCCEEDED and item.embedding is not None and item.output is not None:
        dims = int(item.output["dims"])
        vectors = np.frombuffer(item.embedding, dtype="<f4").reshape(-1, dims)
        response = {
            "model": model,
            "embeddings": [[float(f"{x:.9g}") for x in row] for row in vectors.tolist()],
            "prompt_eval_count": item.output.get("prompt_eval_count", 0),
        }
    line = {
        "custom_id": item.custom_id,
        "index": item.seq,
        "state": readstates.reads_as(item.state, job_status),
        "response": response if item.state == ItemState.SUCCEEDED else None,
        "error": item.error,
    }
    if item.cached:
        line["cached"] = True  # served from the result cache (the job was submitted with cache: true)
    body = item.input or {}
    if "metadata" in body:
        line["metadata"] = body["metadata"]
    if include_input:
        line["input"] = {k: v for k, v in body.items() if k != "metadata"}
    return line
