"""Anthropic's Message Batches on corral jobs: a batch *is* a chat job (id ``msgbatch_...``, the same tables and
workers as every job: chunked, crash-safe, fair-shared, cancellable, with the server's webhooks, listed by
``corral jobs``).

Each request's ``params`` is read as the same Messages body the sync route reads (corral/wire/anthropic.py)
and becomes a job item holding the native chat the sync route would run.  A request that does not validate,
streams, or names another model than the batch's (a corral job runs one model: the first valid request's)
becomes an ``errored`` result at once; those are kept in the job's ``meta`` (``anthropic_batch.errored``), so
nothing new is stored beyond the job and its items.

State mapping (the job's status stays the truth): queued/running -> ``in_progress``; cancelled while an item
still runs -> ``canceling``; any other end -> ``ended``.  As Anthropic's, ``request_counts`` keep every
request in ``processing`` until the batch ends; then an item that succeeded is ``succeeded``, one that failed
``errored``, and one that never ran ``canceled`` (``expired`` when the reconciler stopped the batch at its
24-hour window).  Results are rendered from the items on read, as JSONL.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.errors import BadRequest, CorralError, ModelNotFound, NotFound
from corral.modelstore.store import ModelName, ModelRecord, ModelStore
from corral.timefmt import rfc3339
from corral.wire.anthropic import BatchCreate, MessagesRequest, context_cap, parse
from corral.wire.anthropic_reply import error_body, from_native_final
from jobs.db import poll, sessions
from jobs.ids import openai_id
from jobs.models import Item, ItemState, Job, JobStatus, as_utc, utcnow
from jobs.service import JobService
from jobs.status import read_status

if TYPE_CHECKING:
    from jobs.keys import Principal

META = "anthropic_batch"
PREFIX = "msgbatch_"
WINDOW = timedelta(hours=24)
MAX_ERROR_CHARS = 1000


@dataclass
class MessageBatches:
    """Create, read, list, cancel and delete Message Batches; render their results."""

    store: ModelStore
    jobs: JobService

    def _session(self) -> Session:
        return sessions(self.jobs.settings)()

    # -- creation ---------------------------------------------------------------------------------------

    def create(self, body: BatchCreate, *, owner: str | None = None, quota: Principal | None = None) -> str:
        """Queue the batch's valid requests as one chat job; return its id."""
        ident = openai_id(PREFIX)
        errored: list[dict[str, Any]] = []
        items: list[tuple[str, dict[str, Any]]] = []
        model = ""
        record: ModelRecord | None = None
        refusal: CorralError = ModelNotFound("no model")
        for request in body.requests:
            try:
                params: MessagesRequest = parse(MessagesRequest, request.params)
                if params.stream:
                    raise BadRequest("stream: streaming is not supported in a batch")
                if not model:
                    model = params.model
                    try:
                        record = self._record(model)
                    except CorralError as exc:
                        refusal = exc
                elif params.model != model:
                    raise BadRequest(f"model: every request of a batch runs on one model here ('{model}')")
                if record is None:
                    raise refusal
                items.append((request.custom_id, self._native(record, params)))
            except CorralError as exc:
                errored.append({"custom_id": request.custom_id, "status": exc.status_code,
                                "message": exc.message[:MAX_ERROR_CHARS]})
        info = {"errored": errored, "total": len(body.requests)}
        if not items:
            self._ended(ident, model, info, owner)
        else:
            assert record is not None
            self.jobs.submit(kind="chat", model=model, items=iter(items), metadata={META: info}, owner=owner,
                             job_id=ident, expires_at=utcnow() + WINDOW, quota=quota)
        return ident

    def _record(self, model: str) -> ModelRecord:
        try:
            record = self.store.get(model)
        except (ModelNotFound, BadRequest) as exc:
            raise ModelNotFound(f"model '{model}' not found") from exc
        if "completion" not in record.capabilities:
            raise BadRequest(f'"{model}" does not support chat')
        return record

    def _native(self, record: ModelRecord, params: MessagesRequest) -> dict[str, Any]:
        """The job item: the native chat the sync route runs (the worker applies the stop sequences)."""
        native = params.native(thinks="thinking" in record.capabilities)
        if native.plan.tools and "tools" not in record.capabilities:
            raise BadRequest(f"{ModelName.parse(params.model).display} does not support tools")
        if native.images and "vision" not in record.capabilities:
            raise BadRequest(f"{ModelName.parse(params.model).display} does not support vision: the request has images")
        options = params.options(context_cap(record, self.jobs.settings.default_num_ctx))
        if params.stops():
            options["stop"] = params.stops()
        item: dict[str, Any] = {"messages": native.messages, "options": options}
        if native.plan.tools:
            item["tools"] = native.plan.tools
        if native.plan.format is not None:
            item["format"] = native.plan.format
        if native.think is not None:
            item["think"] = native.think
        if native.plan.forced:
            item["anthropic_forced"] = sorted(native.plan.forced)  # a forced call the parser left as text
        return item

    def _ended(self, ident: str, model: str, info: dict[str, Any], owner: str | None) -> None:
        """A batch none of whose requests is valid: ended at once, every request errored."""
        now = utcnow()
        with self._session() as session:
            session.add(Job(id=ident, kind="chat", model=model, model_digest="", options={},
                            status=JobStatus.COMPLETED, item_count=0, chunk_size=1, owner=owner, meta={META: info},
                            created_at=now, finished_at=now, expires_at=now + WINDOW))
            session.commit()

    # -- reading ----------------------------------------------------------------------------------------

    def _job(self, session: Session, ident: str, owner: str | None) -> Job:
        return self._owned(session.get(Job, ident), ident, owner)

    @staticmethod
    def _owned(job: Job | None, ident: str, owner: str | None) -> Job:
        if job is None or META not in (job.meta or {}) or (owner is not None and job.owner != owner):
            raise NotFound(f"message batch '{ident}' not found")
        return job

    def get(self, ident: str, owner: str | None, base_url: str) -> dict[str, Any]:
        """A status poll, read as a job's is (:meth:`JobService.get`): the job and its item states in one
        statement through :func:`jobs.db.poll`, one round trip."""
        return poll(self.jobs.settings, lambda session: self._polled(session, ident, owner, base_url))

    def _polled(self, session: Session, ident: str, owner: str | None, base_url: str) -> dict[str, Any]:
        read = read_status(session, ident)
        job = self._owned(read.job if read else None, ident, owner)
        return self._view(session, job, base_url, read.stored if read else None)

    def list(self, *, before_id: str | None, after_id: str | None, limit: int, owner: str | None,
             base_url: str) -> dict[str, Any]:
        """Newest first; ``after_id`` pages on to older batches, ``before_id`` back to newer ones."""
        with self._session() as session:
            query = select(Job).where(Job.id.like(PREFIX.replace("_", "\\_") + "%", escape="\\"))
            if owner is not None:
                query = query.where(Job.owner == owner)
            newest_first = (Job.created_at.desc(), Job.id.desc())
            if after_id:
                cursor = self._job(session, after_id, owner)
                query = query.where((Job.created_at < cursor.created_at)
                                    | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id)))
            elif before_id:
                cursor = self._job(session, before_id, owner)
                query = query.where((Job.created_at > cursor.created_at)
                                    | ((Job.created_at == cursor.created_at) & (Job.id > cursor.id)))
                newest_first = (Job.created_at.asc(), Job.id.asc())  # the nearest newer ones, reversed below
            rows = list(session.scalars(query.order_by(*newest_first).limit(limit + 1)))
            page = rows[:limit]
            if before_id:
                page.reverse()
            data = [self._view(session, job, base_url) for job in page]
        return {"data": data, "has_more": len(rows) > limit, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    def cancel(self, ident: str, owner: str | None, base_url: str) -> dict[str, Any]:
        with self._session() as session:
            job = self._job(session, ident, owner)
            active = job.status in JobStatus.ACTIVE
        if active:
            self.jobs.cancel(ident, owner)
        return self.get(ident, owner, base_url)

    def delete(self, ident: str, owner: str | None) -> dict[str, Any]:
        with self._session() as session:
            job = self._job(session, ident, owner)
            if self._status(session, job) != "ended":
                raise BadRequest(f"message batch '{ident}' is still processing: cancel it, then delete it once it "
                                 "has ended")
        self.jobs.delete(ident, owner)
        return {"id": ident, "type": "message_batch_deleted"}

    @staticmethod
    def _states(session: Session, job_id: str) -> dict[str, int]:
        rows = session.execute(select(Item.state, func.count()).where(Item.job_id == job_id).group_by(Item.state))
        return {state: int(n) for state, n in rows}

    def _status(self, session: Session, job: Job, states: dict[str, int] | None = None) -> str:
        if job.status in JobStatus.ACTIVE:
            return "in_progress"
        states = self._states(session, job.id) if states is None else states
        return "canceling" if job.status == JobStatus.CANCELLED and states.get(ItemState.RUNNING) else "ended"

    def _view(self, session: Session, job: Job, base_url: str, states: dict[str, int] | None = None) -> dict[str, Any]:
        """The batch as Anthropic shows it, from its items per stored state (read here unless given)."""
        info = job.meta[META]
        if states is None:  # an open batch shows its total as processing: its items need no count
            states = {} if job.status in JobStatus.ACTIVE else self._states(session, job.id)
        status = self._status(session, job, states)
        errored = len(info.get("errored") or [])
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if status == "ended":
            unrun = sum(states.get(s, 0) for s in (ItemState.CANCELLED, ItemState.PENDING, ItemState.RUNNING))
            counts.update(succeeded=states.get(ItemState.SUCCEEDED, 0),
                          errored=states.get(ItemState.FAILED, 0) + errored)
            counts["expired" if job.status == JobStatus.EXPIRED else "canceled"] = unrun
        else:
            counts["processing"] = int(info.get("total") or job.item_count + errored)
        ended = rfc3339(as_utc(job.finished_at)) if status == "ended" and job.finished_at else None
        stopped = job.status == JobStatus.CANCELLED and job.finished_at is not None
        return {
            "id": job.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": rfc3339(as_utc(job.created_at)),
            "expires_at": rfc3339(as_utc(job.expires_at or job.created_at + WINDOW)),
            "ended_at": ended,
            "cancel_initiated_at": rfc3339(as_utc(job.finished_at)) if stopped and job.finished_at else None,
            "archived_at": None,
            "results_url": f"{base_url.rstrip('/')}/v1/messages/batches/{job.id}/results" if ended else None,
        }

    # -- results ----------------------------------------------------------------------------------------

    def results(self, ident: str, owner: str | None) -> Iterator[bytes]:
        """One JSONL line per request: the items in order, then the requests that errored at creation."""
        with self._session() as session:
            job = self._job(session, ident, owner)
            if self._status(session, job) != "ended":
                raise BadRequest(f"message batch '{ident}' is still processing: its results come when it has ended")
            model, expired, errored = job.model, job.status == JobStatus.EXPIRED, list(job.meta[META]["errored"])
        return self._lines(ident, model, expired, errored)

    def _lines(self, ident: str, model: str, expired: bool, errored: builtins.list[dict[str, Any]]) -> Iterator[bytes]:
        last = -1
        while True:
            with self._session() as session:
                page = list(session.scalars(select(Item).where(Item.job_id == ident, Item.seq > last)
                                            .order_by(Item.seq).limit(500)))
            if not page:
                break
            for item in page:
                last = item.seq
                yield _line(item.custom_id or "", _result(item, model, expired))
        for entry in errored:
            yield _line(entry["custom_id"], {"type": "errored",
                                             "error": error_body(entry["message"], int(entry["status"]))})


def _result(item: Item, model: str, expired: bool) -> dict[str, Any]:
    if item.state == ItemState.SUCCEEDED:
        forced = (item.input or {}).get("anthropic_forced")
        message = from_native_final(model, item.output or {}, forced, ident=f"msg_{item.job_id[len(PREFIX):]}{item.seq:08x}")
        return {"type": "succeeded", "message": message}
    if item.state == ItemState.FAILED:
        status = int((item.output or {}).get("status_code", 500))
        return {"type": "errored", "error": error_body(item.error or "request failed", status)}
    return {"type": "expired" if expired else "canceled"}


def _line(custom_id: str, result: dict[str, Any]) -> bytes:
    return (json.dumps({"custom_id": custom_id, "result": result}, separators=(",", ":"), ensure_ascii=False)
            + "\n").encode()


