"""Stored ``/v1/responses`` responses (``store: true``, OpenAI's default), owned by the API key that made them.

A row keeps the Response object as it was sent, the input items the request gave (with their ids, for
``GET /v1/responses/{id}/input_items``) and the id of the response it continued.  ``previous_response_id``
walks those links back: the conversation is every ancestor's input and output, oldest first, then the new
input (OpenAI's rule; ``instructions`` are per request and not inherited).  So each row holds only its own turn,
and a chain of N turns costs N small reads, never a copy of the whole history per turn.

A ``background`` response runs as a durable job of one chat item, whose id is the response's: the row holds
its ``queued`` envelope until a read (``GET``, or a chain that continues it) finds the job ended, and then the
Response the item's result makes (:func:`_from_job`); cancelling it cancels the job.  An item already running
when the cancel comes may still finish (its claim holds; jobs/transitions.py): until it settles the response
reads ``in_progress``, and then as the item ended, so ``GET`` and the job's results agree.  A chain onto one not
yet ended is a 400, and a chain's whole conversation is bounded (:data:`HISTORY_BODIES`).

A row another key made is not found (404, never 403: ids are not confirmed to exist); so is one past its
``expires_at`` (``CORRAL_RESPONSES_TTL``), and the reconciler's hourly sweep deletes those (:func:`purge`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from corral.errors import BadRequest, NotFound
from corral.settings import Settings
from corral.wire.openai_responses import (
    MAX_INPUT_ITEMS,
    PreviousResponseNotFound,
    ResponseNotFound,
    ResponsesRequest,
)
from corral.wire.openai_responses_output import Draft, job_response
from jobs.db import sessions
from jobs.files import cursor_page
from jobs.models import Item, ItemState, Job, JobStatus, StoredResponse, as_utc, utcnow
from jobs.stopping import stop_jobs
from jobs.transitions import delete_job

if TYPE_CHECKING:
    from jobs.service import JobService

ACTIVE = ("queued", "in_progress")  # a background response's statuses before its end
MAX_CHAIN = 1000  # responses a previous_response_id may reach back through
# The conversation a chain brings back, at most: as many items as one request's input may hold, and this many
# times CORRAL_MAX_BODY of JSON (a 100-byte request must not make the server build gigabytes of messages; a
# few bodies' worth leaves room for the replies the turns added to their inputs).
HISTORY_BODIES = 4
PAGE_LIMIT = 100


@dataclass
class ResponseStore:
    """Save, read, chain, page and delete stored responses."""

    settings: Settings

    def _session(self) -> Session:
        return sessions(self.settings)()

    def _row(self, session: Session, ident: str, owner: str | None) -> StoredResponse | None:
        row = session.get(StoredResponse, ident)
        if row is None or (owner is not None and row.owner != owner) or as_utc(row.expires_at) <= utcnow():
            return None
        return row

    def save(self, body: dict[str, Any], input_items: list[dict[str, Any]], *, owner: str | None) -> None:
        """Keep a finished (or failed) response; saving it again (the same id) replaces it."""
        with self._session() as session:
            session.merge(StoredResponse(
                id=body["id"], owner=owner, model=str(body.get("model", ""))[:400], status=body["status"],
                previous_id=body.get("previous_response_id"), body=body, input_items=input_items,
                created_at=utcnow(), expires_at=utcnow() + timedelta(seconds=self.settings.responses_ttl),
            ))
            session.commit()

    def forget(self, ident: str) -> None:
        """Delete a background response's row whose submit failed, unless its job was committed all the same
        (then it runs, and the row is how the client reads its end)."""
        with self._session() as session:
            if session.get(Job, ident) is None:
                session.execute(delete(StoredResponse).where(StoredResponse.id == ident))
                session.commit()

    def get(self, ident: str, owner: str | None) -> dict[str, Any]:
        """A stored response; a background one as its job stands now (saved once it has ended)."""
        with self._session() as session:
            row = self._row(session, ident, owner)
            if row is None:
                raise ResponseNotFound(ident)
            return _current(session, row)

    def cancel(self, ident: str, owner: str | None, jobs: JobService) -> dict[str, Any]:
        """Cancel a background response's job (an ended one is left as it ended); others are a 400."""
        body = self.get(ident, owner)
        if not body.get("background"):
            raise BadRequest("Cannot cancel a synchronous response.", param="response_id")
        if body["status"] in ACTIVE:
            jobs.cancel(ident, owner)
        return self.get(ident, owner)

    def history(self, ident: str, owner: str | None) -> list[dict[str, Any]]:
        """The items of the conversation ``ident`` ends: each ancestor's input then output, oldest first."""
        turns: list[list[dict[str, Any]]] = []
        items, size, most = 0, 0, HISTORY_BODIES * self.settings.max_body
        with self._session() as session:
            current: str | None = ident
            while current is not None:
                if len(turns) >= MAX_CHAIN:
                    raise BadRequest(f"previous_response_id reaches back through more than {MAX_CHAIN} responses",
                                     param="previous_response_id")
                row = self._row(session, current, owner)
                if row is None:  # the named one, or an ancestor since deleted or expired
                    raise PreviousResponseNotFound(current)
                body = _current(session, row)  # a background one as its job ended, not its queued envelope
                if body["status"] in ACTIVE:
                    raise BadRequest(f"Previous response with id '{current}' is still {body['status']}: "
                                     "wait until it has finished to continue it.", param="previous_response_id")
                turn = [*row.input_items, *(body.get("output") or [])]
                items += len(turn)
                size += sum(len(json.dumps(item)) for item in turn)
                if items > MAX_INPUT_ITEMS or size > most:
                    raise BadRequest(
                        f"the conversation previous_response_id continues holds more than {MAX_INPUT_ITEMS} items or "
                        f"{most} bytes: start a new one, or send a shorter history with store: false",
                        param="previous_response_id")
                turns.append(turn)
                current = row.previous_id
        return [item for turn in reversed(turns) for item in turn]

    def input_items(self, ident: str, owner: str | None, *, after: str | None = None, limit: int = 20,
                    order: str = "desc") -> dict[str, Any]:
        """A page of the response's input items, as OpenAI pages them (``after`` an item id, newest first)."""
        if order not in ("asc", "desc"):
            raise BadRequest("order must be 'asc' or 'desc'", param="order")
        if not 1 <= limit <= PAGE_LIMIT:
            raise BadRequest(f"limit must be between 1 and {PAGE_LIMIT}", param="limit")
        with self._session() as session:
            row = self._row(session, ident, owner)
            if row is None:
                raise ResponseNotFound(ident)
            items = list(row.input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if at is None:
                raise BadRequest(f"No input item with id '{after}' in response '{ident}'", param="after")
            items = items[at + 1:]
        return cursor_page(items[:limit], has_more=len(items) > limit)

    def delete(self, ident: str, owner: str | None, jobs: JobService) -> dict[str, Any]:
        """The response goes, and a background response's job with it (stopped if it runs: its items hold the
        conversation too)."""
        with self._session() as session:
            row = self._row(session, ident, owner)
            if row is None:
                raise ResponseNotFound(ident)
            background = bool(row.body.get("background"))
            session.delete(row)
            session.commit()
        if background:
            try:
                jobs.delete(ident, owner)
            except NotFound:
                pass  # deleted as a job already
        return {"id": ident, "object": "response.deleted", "deleted": True}


def purge(session: Session, client: redis.Redis) -> int:
    """Delete the responses past their ``expires_at`` (the reconciler's hourly sweep), and the background ones'
    jobs with them, as ``DELETE /api/jobs/{id}`` deletes a job (jobs/stopping.py: one still running stops, its
    queued messages leave the broker); commits; returns how many responses went."""
    now = utcnow()
    expired = select(StoredResponse.id).where(StoredResponse.expires_at <= now)
    jobs = [(str(job_id), str(digest)) for job_id, digest in
            session.execute(select(Job.id, Job.model_digest).where(Job.id.in_(expired))).all()]

    if jobs:
        stop_jobs(session, client, jobs, partial(delete_job, session))  # as JobService.delete removes a job
    result = session.execute(delete(StoredResponse).where(StoredResponse.expires_at <= now))
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


def _current(session: Session, row: StoredResponse) -> dict[str, Any]:
    """A stored response as it stands: a background one as its job stands now, saved once it has ended."""
    body = dict(row.body)
    if body.get("background") and body["status"] in ACTIVE:
        body, settled = _from_job(session, body)
        if settled:
            row.body, row.status = body, body["status"]
            session.commit()
    return body


def _from_job(session: Session, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A background response as its job (same id, one item) stands: queued, in progress, or its end; and
    whether that is settled (saved, never read from the job again).

    An item running under a stopped job is not settled: its claim holds, and it may yet succeed (or stop at the
    cancel flag); it reads ``in_progress`` until it has (a worker that died meanwhile: the reconciler writes its
    item cancelled), and then as it ended, as the job's results say.
    """
    job = session.get(Job, body["id"])
    item = session.scalars(select(Item).where(Item.job_id == body["id"])).first()
    if job is None or item is None:  # the job was deleted (DELETE /api/jobs/{id}) before it ended
        return {**body, "status": "failed", "error": {"code": "server_error", "message": "its job was deleted"}}, True
    echo = (item.input or {}).get("responses") or {}
    draft = Draft(ResponsesRequest.model_validate(echo), ident=body["id"], created_at=int(body["created_at"]))
    if item.state == ItemState.SUCCEEDED:
        return job_response(echo, item.output or {}, body["id"], int(body["created_at"])), True
    if item.state == ItemState.FAILED:
        error = {"code": "server_error", "message": item.error or "request failed"}
        return draft.envelope("failed", [], error=error), True
    if item.state == ItemState.RUNNING:
        return draft.envelope("in_progress", []), False
    if job.status == JobStatus.CANCELLED:
        return draft.envelope("cancelled", []), True
    if job.status in (JobStatus.EXPIRED, JobStatus.FAILED):
        return draft.envelope("failed", [], error={"code": "server_error", "message": job.error or job.status}), True
    return draft.envelope("queued", []), False
