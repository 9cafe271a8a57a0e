"""OpenAI's Batch API on top of corral jobs: a batch *is* a job (id ``batch_...``, same tables, same workers,
listed by ``corral jobs``), created from an uploaded JSONL file.

Creation validates every line first (``custom_id`` unique, ``method`` POST, ``url`` equal to the batch's
endpoint, one model, a body the sync route would accept, no ``stream``, ``tools`` only for a tools model);
any problem fails the batch with
``errors.data[].line`` and no work is queued.  A valid file becomes job items holding the same native request
the sync route would run (:mod:`corral.wire.openai`), so results match the sync endpoints.

Status mapping (the job's status stays the truth): queued/running -> ``in_progress``; completed ->
``completed``; failed -> ``failed``; cancelled -> ``cancelling`` while an item still runs, then ``cancelled``;
expired (the reconciler stops a batch still unfinished 24h after creation) -> ``finalizing`` while a stopped
item winds down, then ``expired``, with the unfinished requests in the error file as ``batch_expired``.
Output and error files appear when the batch ends, in OpenAI's line format and in input order; their content
is rendered from the items on read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.errors import BadRequest, CorralError, NotFound
from corral.modelstore.capabilities import kind_refusal
from corral.modelstore.store import ModelStore
from corral.wire.jobs import RerankItem, problem
from corral.wire.ollama import parse_json
from corral.wire.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    embedding_list,
    error_body,
    from_native_final,
    parse_request,
)
from corral.wire.openai_responses import batch_body
from corral.wire.openai_responses_output import job_response
from corral.wire.rerank import rerank_reply
from jobs.db import poll, read_after_commit, sessions
from jobs.files import FileStore, cursor_page, epoch, new_file_id
from jobs.ids import openai_id
from jobs.ingest import MAX_LINE_BYTES
from jobs.models import Item, ItemState, Job, JobStatus, StoredFile, utcnow
from jobs.readstates import reads_as, stored_states
from jobs.service import JobService
from jobs.status import Counts, item_counts, read_status

if TYPE_CHECKING:
    from jobs.keys import Principal

ENDPOINT_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "generate", "/v1/embeddings": "embed",
                  "/v1/rerank": "rerank", "/v1/responses": "chat"}
MAX_ERRORS = 1000
WINDOW = timedelta(hours=24)


class LineError(Exception):
    """One invalid input line: becomes an entry of the failed batch's ``errors.data``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def batch_id() -> str:
    return openai_id("batch_")


def parse_line(endpoint: str, raw: bytes) -> tuple[str, str, dict[str, Any]]:
    """One line of a batch input file -> (custom_id, model, the native item body)."""
    if len(raw) > MAX_LINE_BYTES:
        raise LineError("line_too_long", f"the line is longer than {MAX_LINE_BYTES} bytes")
    try:
        obj = parse_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LineError("invalid_json_line", f"this line is not valid JSON: {exc}") from exc
    except BadRequest as exc:
        raise LineError("invalid_json_line", exc.message) from exc
    if not isinstance(obj, dict):
        raise LineError("invalid_json_line", "each line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise LineError("missing_required_parameter", "custom_id must be a non-empty string (at most 512 characters)",
                        "custom_id")
    if obj.get("method", "POST") != "POST":
        raise LineError("invalid_method", "method must be POST", "method")
    if obj.get("url") != endpoint:
        raise LineError("mismatched_endpoint", f"url {obj.get('url')!r} does not match the batch's endpoint {endpoint!r}",
                        "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError("missing_required_parameter", "body must be a JSON object", "body")
    if body.get("stream"):
        raise LineError("invalid_request", "streaming is not supported in a batch", "body.stream")
    try:
        model, native = _native_body(endpoint, body)
    except CorralError as exc:
        raise LineError("invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body") from exc
    if not model:
        raise LineError("missing_required_parameter", "body.model is required", "body.model")
    return custom_id, model, native


def _native_body(endpoint: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if endpoint == "/v1/responses":
        return batch_body(body)  # the item holds a native chat, and the settings its Response echoes
    if endpoint == "/v1/chat/completions":
        chat: ChatCompletionRequest = parse_request(ChatCompletionRequest, body)
        native: dict[str, Any] = {"messages": chat.native_messages(), "options": chat.native_options(),
                                  **chat.native_logprobs()}
        think = chat.think()
        if think is not None:
            native["think"] = think
        if chat.tools:
            native["tools"] = chat.tools
        fmt = chat.native_format()
        if fmt is not None:
            native["format"] = fmt
        return chat.model, native
    if endpoint == "/v1/completions":
        comp: CompletionRequest = parse_request(CompletionRequest, body)
        if not comp.prompt:
            raise BadRequest("prompt must be a non-empty string", param="prompt")
        if comp.suffix:
            raise BadRequest("suffix is not supported by this model", param="suffix")
        return comp.model, {"prompt": comp.prompt, "options": comp.native_options(), **comp.native_logprobs()}
    if endpoint == "/v1/rerank":
        try:
            item = RerankItem.model_validate(body)
        except ValidationError as exc:
            message, field = problem(exc)
            raise BadRequest(message, param=field) from exc
        model = body.get("model")
        return model if isinstance(model, str) else "", item.model_dump(include=set(RerankItem.stored_fields()),
                                                                        exclude_none=True)
    emb: EmbeddingRequest = parse_request(EmbeddingRequest, body)
    native = {"input": emb.inputs(), "truncate": True, "openai_encoding": emb.encoding()}
    if emb.dimensions:
        native["dimensions"] = emb.dimensions
    return emb.model, native


class _FilesToMake(Exception):
    """A poll met an ended batch whose result files are still to be made: a write, which :meth:`BatchService.get`
    does in a session."""


@dataclass
class BatchService:
    """Create, read, list and cancel batches; render their output and error files."""

    store: ModelStore
    jobs: JobService
    files: FileStore

    def _session(self) -> Session:
        return sessions(self.jobs.settings)()

    # -- creation ---------------------------------------------------------------------------------------

    def create(
        self, *, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, Any] | None,
        owner: str | None = None, quota: Principal | None = None, webhook_url: str | None = None,
    ) -> dict[str, Any]:
        if endpoint not in ENDPOINT_KINDS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINT_KINDS)}", param="endpoint")
        if completion_window != "24h":
            raise BadRequest("completion_window must be '24h'", param="completion_window")
        _check_metadata(metadata)
        try:
            file = self.files.get(input_file_id, owner)
        except NotFound as exc:
            raise NotFound(exc.message, param="input_file_id") from exc
        if file["purpose"] != "batch":
            raise BadRequest(f"file {input_file_id} has purpose '{file['purpose']}', not 'batch'", param="input_file_id")
        info = {"endpoint": endpoint, "input_file_id": input_file_id, "completion_window": completion_window,
                "metadata": metadata or {}, "errors": None}
        kind = ENDPOINT_KINDS[endpoint]
        ident = batch_id()
        model, errors, count, lines = self._validate(input_file_id, endpoint)
        if not errors and count == 0:
            errors = [{"code": "empty_file", "line": None, "message": "the input file has no requests", "param": None}]
        if not errors:
            errors = self._check_model(model, kind, *lines)
        if errors:
            return self._failed(ident, kind, model, info, errors, owner)
        items = ((custom_id, native) for custom_id, _, native in self._parsed(input_file_id, endpoint))
        job = self.jobs.submit(kind=kind, model=model, items=items, metadata={"openai_batch": info}, owner=owner,
                               job_id=ident, expires_at=utcnow() + WINDOW, quota=quota, webhook_url=webhook_url)
        batch = read_after_commit(lambda: self.get(ident, owner), f"the reply for batch {ident}")
        if (job.get("webhook") or {}).get("secret"):
            batch["webhook_secret"] = job["webhook"]["secret"]  # shown this once, as on /api/jobs
        return batch

    def _validate(self, file_id: str, endpoint: str) -> tuple[str, list[dict[str, Any]], int, tuple[int | None, int | None]]:
        """Every line checked before anything runs: (model, errors, request count, (first line with tools, first
        line with thinking on))."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        model = ""
        count = 0
        tools_line: int | None = None
        think_line: int | None = None

        def error(number: int, code: str, message: str, param: str | None) -> None:
            if len(errors) < MAX_ERRORS:
                errors.append({"code": code, "line": number, "message": message, "param": param})

        for number, raw in self.files.lines(file_id, MAX_LINE_BYTES):
            count += 1
            try:
                custom_id, line_model, native = parse_line(endpoint, raw)
            except LineError as exc:
                error(number, exc.code, exc.message, exc.param)
                continue
            if tools_line is None and native.get("tools"):
                tools_line = number
            if think_line is None and native.get("think") not in (None, False):
                think_line = number
            if custom_id in seen:
                error(number, "duplicate_custom_id", f"custom_id '{custom_id}' is used more than once", "custom_id")
            seen.add(custom_id)
            if not model:
                model = line_model
            elif line_model != model:
                error(number, "mismatched_model", f"every request in a batch must use the same model ({model!r})",
                      "body.model")
        return model, errors, count, (tools_line, think_line)

    def _check_model(self, model: str, kind: str, tools_line: int | None, think_line: int | None) -> list[dict[str, Any]]:
        try:
            record = self.store.get(model)
        except CorralError:
            return [{"code": "model_not_found", "line": 1, "message": f"model '{model}' not found", "param": "body.model"}]
        refusal = kind_refusal(record.capabilities, model, kind)
        if refusal:
            return [{"code": "invalid_request", "line": 1, "message": refusal, "param": "body.model"}]
        if tools_line is not None and "tools" not in record.capabilities:
            return [{"code": "invalid_request", "line": tools_line, "message": f'"{model}" does not support tools',
                     "param": "body.tools"}]
        if think_line is not None and "thinking" not in record.capabilities:
            return [{"code": "invalid_request", "line": think_line, "message": f'"{model}" does not support thinking',
                     "param": "body.reasoning_effort"}]
        return []

    def _parsed(self, file_id: str, endpoint: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for _, raw in self.files.lines(file_id, MAX_LINE_BYTES):
            yield parse_line(endpoint, raw)

    def _failed(
        self, ident: str, kind: str, model: str, info: dict[str, Any], errors: list[dict[str, Any]], owner: str | None
    ) -> dict[str, Any]:
        info = {**info, "errors": errors}
        now = utcnow()
        with self._session() as session:
            session.add(Job(
                id=ident, kind=kind, model=model or "", model_digest="", options={}, status=JobStatus.FAILED, item_count=0,
                chunk_size=1, owner=owner, meta={"openai_batch": info}, error=f"input file failed validation: "
                f"{len(errors)} error(s), first on line {errors[0]['line']}: {errors[0]['message']}",
                created_at=now, finished_at=now,
            ))
            session.commit()
        return self.get(ident, owner)

    # -- reading ----------------------------------------------------------------------------------------

    def _job(self, session: Session, ident: str, owner: str | None) -> Job:
        return self._owned(session.get(Job, ident), ident, owner)

    @staticmethod
    def _owned(job: Job | None, ident: str, owner: str | None) -> Job:
        if job is None or "openai_batch" not in (job.meta or {}) or (owner is not None and job.owner != owner):
            raise NotFound(f"No batch found with id '{ident}'.", param="batch_id")
        return job

    def get(self, ident: str, owner: str | None = None) -> dict[str, Any]:
        """A status poll, read as a job's is (:meth:`JobService.get`): the job and its counts in one statement
        through :func:`jobs.db.poll`, and an ended batch's result files in a second.  The first view of an ended
        batch makes those files, a write, so that one view is read again in a session."""
        try:
            return poll(self.jobs.settings, lambda session: self._polled(session, ident, owner))
        except _FilesToMake:
            with self._session() as session:
                return self._view(session, self._job(session, ident, owner))

    def _polled(self, session: Session, ident: str, owner: str | None) -> dict[str, Any]:
        read = read_status(session, ident)
        job = self._owned(read.job if read else None, ident, owner)
        return self._view(session, job, read.counts() if read else None, make_files=False)

    def list(self, *, after: str | None = None, limit: int = 20, owner: str | None = None) -> dict[str, Any]:
        limit = max(1, min(limit, 100))
        with self._session() as session:
            query = select(Job).where(Job.id.like("batch\\_%", escape="\\"))
            if owner is not None:
                query = query.where(Job.owner == owner)
            if after:
                cursor = self._job(session, after, owner)
                query = query.where(
                    (Job.created_at < cursor.created_at) | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
                )
            rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
            data = [self._view(session, job) for job in rows[:limit]]
        return cursor_page(data, has_more=len(rows) > limit)

    def cancel(self, ident: str, owner: str | None = None) -> dict[str, Any]:
        with self._session() as session:
            self._job(session, ident, owner)
        self.jobs.cancel(ident, owner)
        return self.get(ident, owner)

    def _view(self, session: Session, job: Job, counts_and_tokens: Counts | None = None, *,
              make_files: bool = True) -> dict[str, Any]:
        """The batch as OpenAI shows it, from its counts (read here unless given); ``make_files``: an ended batch's
        missing result files are made here (else :class:`_FilesToMake` is raised)."""
        info = job.meta["openai_batch"]
        counts, (prompt_tokens, completion_tokens) = counts_and_tokens or item_counts(session, job.id, job.status)
        status = dict.fromkeys(JobStatus.ACTIVE, "in_progress").get(job.status, job.status)
        if job.status == JobStatus.CANCELLED and counts[ItemState.RUNNING]:
            status = "cancelling"
        elif job.status == JobStatus.EXPIRED and counts[ItemState.RUNNING]:
            status = "finalizing"
        ended = epoch(job.finished_at)
        output_id = error_id = None
        if status in ("completed", "cancelled", "expired"):
            output_id, error_id = self._result_files(session, job, counts, make=make_files)
        errors = info.get("errors")
        return {
            "id": job.id,
            "object": "batch",
            "endpoint": info["endpoint"],
            "model": job.model or None,
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": info["input_file_id"],
            "completion_window": info["completion_window"],
            "status": status,
            "output_file_id": output_id,
            "error_file_id": error_id,
            "created_at": epoch(job.created_at),
            "in_progress_at": epoch(job.created_at) if job.status != JobStatus.FAILED else None,
            "expires_at": epoch(job.expires_at or job.created_at + WINDOW),
            "finalizing_at": ended if status in ("completed", "finalizing") else None,
            "completed_at": ended if status == "completed" else None,
            "failed_at": ended if status == "failed" else None,
            "expired_at": ended if status in ("finalizing", "expired") else None,
            "cancelling_at": ended if status in ("cancelling", "cancelled") else None,
            "cancelled_at": ended if status == "cancelled" else None,
            "request_counts": {"total": job.item_count, "completed": counts["succeeded"], "failed": counts["failed"]},
            "metadata": info.get("metadata") or None,
            "usage": {
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _result_files(self, session: Session, job: Job, counts: dict[str, int], *,
                      make: bool = True) -> tuple[str | None, str | None]:
        """The ended batch's output and error file ids, made on first sight (a race between replicas is fine:
        the unique (job_id, role) constraint keeps one); ``make`` False: :class:`_FilesToMake` instead."""
        wanted = {"output": counts["succeeded"] > 0, "error": counts["failed"] + counts["cancelled"] > 0}
        rows = {r.role: r for r in session.scalars(select(StoredFile).where(StoredFile.job_id == job.id))}
        for role, needed in wanted.items():
            if not needed or role in rows:
                continue
            if not make:
                raise _FilesToMake(job.id)
            size = sum(len(line) for line in self.render(job.id, role))
            row = StoredFile(id=new_file_id(), purpose="batch_output", owner=job.owner,
                             filename=f"{job.id}_{role}.jsonl", bytes=size, job_id=job.id, role=role)
            try:
                with session.begin_nested():
                    session.add(row)
                session.commit()
                rows[role] = row
            except IntegrityError:
                session.rollback()
                rows[role] = session.scalars(
                    select(StoredFile).where(StoredFile.job_id == job.id, StoredFile.role == role)
                ).one()
        return (rows["output"].id if "output" in rows else None, rows["error"].id if "error" in rows else None)

    # -- output files -----------------------------------------------------------------------------------

    def render(self, job_id: str, role: str) -> Iterator[bytes]:
        """The output (``role="output"``: succeeded requests) or error file (failed and cancelled), one JSONL
        line per request, in input order."""
        with self._session() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            kind, model, expired, status = job.kind, job.model, job.status == JobStatus.EXPIRED, job.status
        states = stored_states((ItemState.SUCCEEDED,) if role == "output" else (ItemState.FAILED, ItemState.CANCELLED),
                               status)  # as read: a stopped job's pending items are cancelled
        last = -1
        while True:
            with self._session() as session:
                page = list(session.scalars(
                    select(Item).where(Item.job_id == job_id, Item.seq > last, Item.state.in_(states))
                    .order_by(Item.seq).limit(500)
                ))
            if not page:
                return
            for item in page:
                last = item.seq
                line = _output_line(job_id, kind, model, item, expired, reads_as(item.state, status))
                yield (json.dumps(line, separators=(",", ":")) + "\n").encode()


def _output_line(
    job_id: str, kind: str, model: str, item: Item, expired: bool = False, state: str | None = None
) -> dict[str, Any]:
    state = state or item.state  # as read (jobs/readstates.py)
    ident = f"batch_req_{job_id.removeprefix('batch_')}{item.seq:08x}"
    request_id = f"req_{job_id.removeprefix('batch_')}{item.seq:08x}"
    line: dict[str, Any] = {"id": ident, "custom_id": item.custom_id, "response": None, "error": None}
    if state == ItemState.CANCELLED and expired:
        line["error"] = {"code": "batch_expired",
                         "message": "This request could not be executed before the completion window expired."}
        return line
    if state == ItemState.CANCELLED:
        line["error"] = {"code": "batch_cancelled", "message": "This request was cancelled before it completed."}
        return line
    if state == ItemState.FAILED:
        status = int((item.output or {}).get("status_code", 500))
        kind_name = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        line["response"] = {"status_code": status, "request_id": request_id,
                            "body": error_body(item.error or "request failed", kind_name)}
        return line
    created = epoch(item.finished_at) or 0
    output = item.output or {}
    if kind == "rerank":
        body = rerank_reply(model, output)
    elif kind == "embed":
        dims = int(output["dims"])
        vectors = np.frombuffer(item.embedding or b"", dtype="<f4").reshape(-1, dims)
        body = embedding_list(model, vectors, (item.input or {}).get("openai_encoding", "float"),
                              int(output.get("prompt_eval_count", 0)))
    elif "responses" in (item.input or {}):  # a /v1/responses line
        body = job_response(item.input["responses"], output, f"resp_{job_id.removeprefix('batch_')}{item.seq:08x}",
                              created)
    else:
        body = from_native_final(kind, model, output, created)
        body["id"] = ("chatcmpl-" if kind == "chat" else "cmpl-") + f"{item.seq}"
    line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
    return line


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise BadRequest("metadata must be an object with at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise BadRequest("metadata keys must be at most 64 characters and values strings of at most 512",
                             param="metadata")
