"""Webhooks: a job's end announced to its ``webhook_url``, signed per the Standard Webhooks spec.

When a job ends (completed, failed, cancelled, expired) the transition that ends it also stores a delivery row,
in the same transaction: the event can be lost neither before nor after the commit, and survives a restart of
every process.  A :class:`Sender` in every worker sends due deliveries: a POST of the event with ``webhook-id``,
``webhook-timestamp`` and ``webhook-signature`` (HMAC-SHA256 by the ``standardwebhooks`` package, which receivers
use to verify them).  A 2xx answer delivers it; anything else is retried with exponential backoff (1 s, 2 s, 4 s,
... at most an hour apart) for 24 hours, then the delivery is ``failed``.  Delivery is at least once: a receiver
dedupes on ``webhook-id``.

The receiver is whoever submitted the job, so it is treated as hostile.  The sender runs in a thread of its own
(an asyncio loop), never the heartbeat's: a receiver that drips one byte every few seconds holds one of its
:data:`IN_FLIGHT` attempts for at most :data:`DEADLINE_SECONDS`, which is a total for the attempt (DNS, connect,
request, status line), not httpx's per-read timeout.  Any failure fails that one attempt.  The URL is parsed
strictly at submission and again before each attempt, and its host must resolve to public addresses (checked at
submission, and again at connect time by :mod:`corral.outbound`) unless ``CORRAL_WEBHOOK_ALLOW_NETWORKS`` lets
it reach a receiver on this host or network.  ``last_error`` names the failure in fixed words (an HTTP status,
a timeout, a refused address), never the socket's or httpx's text, which would tell a port scanner what listens
at a refused address; the server's log has the detail.

Workers share due deliveries by claiming them in SQL: a conditional UPDATE moves a row's ``next_attempt_at``
:data:`LEASE` ahead before it is sent, so no other worker sends it meanwhile, and one whose worker died mid-attempt
is due again when the lease runs out.  Each attempt is recorded (``attempts`` + 1) before the next one is made.

The event is ``job.<status>`` with the job's view as ``data``; an OpenAI batch sends OpenAI's own shape,
``{"object": "event", "type": "batch.completed", "data": {"id": "batch_..."}}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook

from corral import outbound
from corral.errors import BadRequest
from corral.settings import Settings
from corral.timefmt import rfc3339
from jobs.db import reason, sessions, unreachable
from jobs.ids import openai_id
from jobs.models import Job, JobStatus, WebhookDelivery, as_utc, utcnow

log = logging.getLogger(__name__)

RETRY_FOR = timedelta(hours=24)
MAX_BACKOFF_SECONDS = 3600
DEADLINE_SECONDS = 10.0  # one attempt, all of it: DNS, connect, request, status line
LEASE = timedelta(seconds=60)  # a claimed delivery is not due for another worker meanwhile (> DEADLINE_SECONDS)
IN_FLIGHT = 8  # attempts one worker makes at once
EVENTS = {JobStatus.COMPLETED: "completed", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled",
          JobStatus.EXPIRED: "expired"}
NO_RESPONSE = f"delivery failed: no response within {DEADLINE_SECONDS:g} s"
NOT_ALLOWED = "delivery failed: address not allowed"


def new_secret() -> str:
    """A signing secret in the spec's form (``whsec_`` + base64 of 24 random bytes), shown once at submit."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_url(url: str, allow_networks: Iterable[str] = ()) -> str:
    """``url`` as a job's ``webhook_url`` (a 400 naming the param unless it is one): strictly parsed, and its host
    resolving only to public addresses or to ``allow_networks`` (``CORRAL_WEBHOOK_ALLOW_NETWORKS``).  The check is
    made again at connect time; this one tells the submitter now rather than in a delivery's ``last_error``."""
    try:
        parsed = outbound.check_url(url)
        host = parsed.raw_host.decode("ascii")
        outbound.resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80),
                         outbound.Policy.allowing(allow_networks))
    except outbound.RefusedURL as exc:
        raise BadRequest(f"webhook_url {exc}", param="webhook_url") from exc
    except outbound.AddressNotAllowed as exc:
        raise BadRequest("webhook_url must reach a public address: its host resolves to one this server does not "
                         "send to (CORRAL_WEBHOOK_ALLOW_NETWORKS)", param="webhook_url") from exc
    except httpx.ConnectError as exc:
        raise BadRequest("webhook_url's host does not resolve", param="webhook_url") from exc
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
        payload: dict[str, Any] = {"object": "event", "id": openai_id("evt_"), "type": event,
                                   "created_at": int(time.time()), "data": {"id": job.id}}
    else:
        payload = {"type": event, "timestamp": rfc3339(as_utc(now)),
                   "data": {"id": job.id, "object": "job", "status": job.status, "kind": job.kind, "model": job.model,
                            "item_count": job.item_count, "error": job.error}}
    session.add(WebhookDelivery(id=openai_id("msg_"), job_id=job.id, event=event, url=job.webhook_url,
                                payload=payload, status="pending", attempts=0, created_at=now, next_attempt_at=now))


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker has claimed for one attempt."""

    id: str
    job_id: str
    url: str
    payload: dict[str, Any]
    attempts: int  # before this attempt
    created_at: datetime
    secret: str | None


class Sender:
    """Sends due deliveries from a thread of its own, :data:`IN_FLIGHT` at a time.

    ``stopping`` says when the worker is shutting down; an attempt cut short then is due again after its lease."""

    def __init__(self, settings: Settings, stopping: Callable[[], bool] = lambda: False) -> None:
        self.sessions: sessionmaker[Session] = sessions(settings)
        # The server's own CORRAL_WEBHOOK_URL is the administrator's receiver: its host may be local or private.
        default_host = [httpx.URL(settings.webhook_url).host] if settings.webhook_url else []
        self.policy = outbound.Policy.allowing(settings.webhook_allow_networks, trusted_hosts=default_host)
        self.default_secret = settings.webhook_secret
        self.interval = settings.reconcile_interval
        self._stopping = stopping
        self._stop = threading.Event()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._main, name="corral-webhooks", daemon=True)
        thread.start()
        return thread

    def _main(self) -> None:
        try:
            asyncio.run(self.run())
        except Exception:  # not expected: run() contains its failures; say so rather than go silent
            log.exception("the webhook sender stopped")

    def stop(self) -> None:
        self._stop.set()

    def stopped(self) -> bool:
        return self._stop.is_set() or self._stopping()

    def client(self) -> httpx.AsyncClient:
        """No redirects followed, a connection per attempt (outbound.NO_POOL), and the environment's proxies as a
        plain client would use them (outbound.proxy_mounts)."""
        return httpx.AsyncClient(transport=outbound.AsyncGuardedTransport(self.policy),
                                 mounts=outbound.proxy_mounts(self.policy, asynchronous=True),
                                 timeout=DEADLINE_SECONDS, follow_redirects=False, trust_env=False)

    async def run(self) -> None:
        """Claim what is due every ``CORRAL_RECONCILE_INTERVAL`` seconds and start its attempts, until stopped."""
        in_flight: set[asyncio.Task[None]] = set()
        out_of_reach = False  # the database: said once when it goes and once when it is back, not every round
        async with self.client() as http:
            while not self.stopped():
                if len(in_flight) < IN_FLIGHT:
                    try:
                        claimed = await asyncio.to_thread(self.claim, IN_FLIGHT - len(in_flight))
                        if out_of_reach:
                            log.info("the database answers again: webhook deliveries go on")
                            out_of_reach = False
                    except DBAPIError as exc:
                        if not unreachable(exc):
                            log.exception("cannot claim due webhook deliveries")
                        elif not out_of_reach:  # restarting, say: the next rounds try again
                            log.warning("cannot claim due webhook deliveries: the database is unreachable (%s); "
                                        "trying every %.0f s", reason(exc), self.interval)
                            out_of_reach = True
                        claimed = []
                    except Exception:  # not expected; the next round tries again
                        log.exception("cannot claim due webhook deliveries")
                        claimed = []
                    for delivery in claimed:
                        task = asyncio.create_task(self.attempt(http, delivery))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                deadline = time.monotonic() + self.interval
                while not self.stopped() and time.monotonic() < deadline:
                    await asyncio.sleep(min(0.25, self.interval))

    def claim(self, limit: int) -> list[Claimed]:
        """Up to ``limit`` due deliveries, each claimed by a conditional UPDATE (the ones another worker claimed
        first are left to it)."""
        now = utcnow()
        with self.sessions() as session:
            due = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.attempts)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(limit)
            ).all()
            ids = [ident for ident, attempts in due if _changed(session, update(WebhookDelivery).where(
                WebhookDelivery.id == ident, WebhookDelivery.status == "pending", WebhookDelivery.attempts == attempts,
                WebhookDelivery.next_attempt_at <= now).values(next_attempt_at=now + LEASE))]
            session.commit()
            if not ids:
                return []
            rows = session.execute(select(WebhookDelivery, Job.webhook_secret)
                                   .join(Job, Job.id == WebhookDelivery.job_id).where(WebhookDelivery.id.in_(ids)))
            return [Claimed(d.id, d.job_id, d.url, d.payload, d.attempts, d.created_at, secret or self.default_secret)
                    for d, secret in rows]

    async def attempt(self, http: httpx.AsyncClient, delivery: Claimed) -> None:
        """One attempt, recorded whatever happens (a failure to record leaves the delivery to its lease)."""
        try:
            error = await post(http, delivery)
        except Exception:  # never more than this one delivery fails
            log.exception("webhook %s for job %s failed", delivery.id, delivery.job_id)
            error = "delivery failed"
        try:
            await asyncio.to_thread(self.record, delivery, error)
        except Exception:
            log.exception("cannot record webhook %s's attempt", delivery.id)

    def record(self, delivery: Claimed, error: str | None) -> None:
        """The attempt's outcome, and when the next one is due; ``failed`` once the next would pass a day."""
        now = utcnow()
        values: dict[str, Any] = {"attempts": delivery.attempts + 1}
        if error is None:
            values.update(status="delivered", delivered_at=now, last_error=None)
        else:
            next_at = now + timedelta(seconds=min(2 ** delivery.attempts, MAX_BACKOFF_SECONDS))
            values.update(last_error=error, next_attempt_at=next_at)
            if next_at - as_utc(delivery.created_at) > RETRY_FOR:
                values["status"] = "failed"
                log.warning("webhook %s for job %s failed for 24 hours; giving up: %s", delivery.id, delivery.job_id,
                            error)
        with self.sessions() as session:
            _changed(session, update(WebhookDelivery).where(
                WebhookDelivery.id == delivery.id, WebhookDelivery.status == "pending",
                WebhookDelivery.attempts == delivery.attempts).values(**values))
            session.commit()


def _changed(session: Session, statement: Any) -> int:
    return int(cast(CursorResult[Any], session.execute(statement)).rowcount)


async def post(http: httpx.AsyncClient, delivery: Claimed) -> str | None:
    """POST one delivery within :data:`DEADLINE_SECONDS`; None when the receiver accepted it, else why not, in
    words that say nothing of what answered (the log has the detail)."""
    try:
        url = outbound.check_url(delivery.url)  # a row stored before URLs were checked strictly
    except outbound.RefusedURL as exc:
        log.warning("webhook %s for job %s: its URL %s", delivery.id, delivery.job_id, exc)
        return "delivery failed: invalid URL"
    body = json.dumps(delivery.payload, separators=(",", ":"))
    now = datetime.now(timezone.utc)
    headers = {"content-type": "application/json", "webhook-id": delivery.id, "webhook-timestamp": str(int(now.timestamp()))}
    if delivery.secret:
        headers["webhook-signature"] = Webhook(delivery.secret).sign(delivery.id, now, body)
    try:
        status = await asyncio.wait_for(_status(http, url, body, headers), DEADLINE_SECONDS)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        log.warning("webhook %s for job %s: no response from %s within %g s", delivery.id, delivery.job_id,
                    delivery.url, DEADLINE_SECONDS)
        return NO_RESPONSE
    except outbound.AddressNotAllowed as exc:
        log.warning("webhook %s for job %s: %s", delivery.id, delivery.job_id, exc)
        return NOT_ALLOWED
    except httpx.HTTPError as exc:
        log.warning("webhook %s for job %s to %s: %s: %s", delivery.id, delivery.job_id, delivery.url,
                    type(exc).__name__, exc)
        return "delivery failed"
    if 200 <= status < 300:
        return None
    return f"delivery failed: HTTP {status}"


async def _status(http: httpx.AsyncClient, url: httpx.URL, body: str, headers: dict[str, str]) -> int:
    async with http.stream("POST", url, content=body, headers=headers) as reply:
        return reply.status_code  # the body is never read


def deliveries(session: Session, job_id: str) -> list[dict[str, Any]]:
    """A job's deliveries, as its view shows them."""
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                           .order_by(WebhookDelivery.created_at))
    return [{"id": d.id, "event": d.event, "status": d.status, "attempts": d.attempts, "last_error": d.last_error,
             "delivered_at": rfc3339(as_utc(d.delivered_at)) if d.delivered_at else None} for d in rows]
