"""Webhooks: a job's end announced to its ``webhook_url``, signed per the Standard Webhooks spec.

When a job ends (completed, failed, cancelled, expired) the transition that ends it also stores a delivery row,
in the same transaction: the event can be lost neither before nor after the commit, and survives a restart of
every process.  The reconciler (jobs/reconcile.py), which runs in the workers, sends due deliveries: a POST of
the event with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` (HMAC-SHA256 by the
``standardwebhooks`` package, which receivers use to verify them).  A 2xx answer delivers it; anything else is
retried with exponential backoff (1 s, 2 s, 4 s, ... at most an hour apart) for 24 hours, then the delivery is
``failed``.  Delivery is at least once: a receiver dedupes on ``webhook-id``.

The event is ``job.<status>`` with the job's view as ``data``; an OpenAI batch sends OpenAI's own shape,
``{"object": "event", "type": "batch.completed", "data": {"id": "batch_..."}}``.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from corral.errors import BadRequest
from corral.timefmt import rfc3339
from jobs.models import Job, JobStatus, WebhookDelivery, as_utc, utcnow

log = logging.getLogger(__name__)

RETRY_FOR = timedelta(hours=24)
MAX_BACKOFF_SECONDS = 3600
PER_SWEEP = 20  # deliveries sent per reconciler pass (each may wait TIMEOUT_SECONDS for a slow receiver)
TIMEOUT_SECONDS = 5.0
EVENTS = {JobStatus.COMPLETED: "completed", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled",
          JobStatus.EXPIRED: "expired"}


def new_secret() -> str:
    """A signing secret in the spec's form (``whsec_`` + base64 of 24 random bytes), shown once at submit."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 2000:
        raise BadRequest(f"webhook_url must be an http(s) URL, not {url[:100]!r}", param="webhook_url")
    return url


def queue_event(session: Session, job_id: str) -> None:
    """Store the delivery of a job's end, when the job has a webhook (call in the transaction that ends it)."""
    job = session.get(Job, job_id, populate_existing=True)  # the status an UPDATE statement just set
    if job is None or not job.webhook_url or job.status not in EVENTS:
        return
    now = utcnow()
    batch = (job.meta or {}).get("openai_batch")
    event = f"{'batch' if batch else 'job'}.{EVENTS[job.status]}"
    if batch:
        payload: dict[str, Any] = {"object": "event", "id": f"evt_{uuid.uuid4().hex[:24]}", "type": event,
                                   "created_at": int(time.time()), "data": {"id": job.id}}
    else:
        payload = {"type": event, "timestamp": rfc3339(as_utc(now)),
                   "data": {"id": job.id, "object": "job", "status": job.status, "kind": job.kind, "model": job.model,
                            "item_count": job.item_count, "error": job.error}}
    session.add(WebhookDelivery(id=f"msg_{uuid.uuid4().hex[:24]}", job_id=job.id, event=event, url=job.webhook_url,
                                payload=payload, status="pending", attempts=0, created_at=now, next_attempt_at=now))


def deliver_due(session: Session, default_secret: str | None = None) -> int:
    """Send the deliveries that are due (at most :data:`PER_SWEEP`); how many were accepted."""
    now = utcnow()
    due = list(session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at).limit(PER_SWEEP)
    ))
    accepted = 0
    with httpx.Client(timeout=TIMEOUT_SECONDS) as http:
        for delivery in due:
            secret = session.scalar(select(Job.webhook_secret).where(Job.id == delivery.job_id)) or default_secret
            error = _send(http, delivery, secret)
            delivery.attempts += 1
            if error is None:
                delivery.status, delivery.delivered_at, delivery.last_error = "delivered", utcnow(), None
                accepted += 1
            else:
                delivery.last_error = error
                wait = min(2 ** (delivery.attempts - 1), MAX_BACKOFF_SECONDS)
                delivery.next_attempt_at = utcnow() + timedelta(seconds=wait)
                if as_utc(delivery.next_attempt_at) - as_utc(delivery.created_at) > RETRY_FOR:
                    delivery.status = "failed"
                    log.warning("webhook %s for job %s failed for 24 hours; giving up: %s", delivery.id,
                                delivery.job_id, error)
            session.commit()  # each attempt is recorded before the next is made
    return accepted


def _send(http: httpx.Client, delivery: WebhookDelivery, secret: str | None) -> str | None:
    """POST one delivery; None when the receiver accepted it, else why not."""
    body = json.dumps(delivery.payload, separators=(",", ":"))
    now = datetime.now(timezone.utc)
    headers = {"content-type": "application/json", "webhook-id": delivery.id, "webhook-timestamp": str(int(now.timestamp()))}
    if secret:
        headers["webhook-signature"] = Webhook(secret).sign(delivery.id, now, body)
    try:
        reply = http.post(delivery.url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= reply.status_code < 300:
        return None
    return f"HTTP {reply.status_code}"


def deliveries(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries, as its view shows them."""
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.created_at))
    return [{"id": d.id, "event": d.event, "status": d.status, "attempts": d.attempts, "last_error": d.last_error,
             "delivered_at": rfc3339(as_utc(d.delivered_at)) if d.delivered_at else None} for d in rows]
