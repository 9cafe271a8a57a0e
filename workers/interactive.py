"""The interactive lane: a worker's own consumer of chat, generate, embed, rerank and load requests.

Interactive requests do not go through Celery.  The API pushes each one, as a small JSON message
(:func:`corral.protocol.interactive_message`), onto its model's list (``corral.<digest>.lane``), and this
lane pops it with one ``BRPOP`` and hands it to a thread of its own.  Celery's path cost a request about 5 ms on
the 2-core VM before its first token, all of it Python: ``send_task`` building a task message in the API
(1.5-2 ms), then in the worker kombu's delivery and its unacknowledged-message bookkeeping (two Redis
transactions) and Celery's request, strategy and pool dispatch (3.4 ms from the push to the request's first
command, traced with Redis ``MONITOR``).  Here it is one ``LPUSH`` and one ``BRPOP`` (bench/stream_overhead.py).

What Celery gave these requests, and how the lane keeps it:

- *Early acknowledgement*: a popped message is gone, as an early-acked task was.  A worker that dies between
  the pop and the request's start loses it, and the API sends it again when the queue is empty and no worker
  has started it (:class:`corral.protocol.StreamReader`, ``resend``); ``started_key`` keeps a copy from running
  twice.
- *Expiry*: a message past its ``expires`` (the API's ``queue_timeout``, whose reader has given up) is dropped.
- *Prefetch of one*: the lane pops only while one of its threads is free, so a busy worker leaves requests on
  the list for another worker of the model.
- *Interactive before batch*: the lane never waits behind a batch chunk; chunks stay Celery tasks on their own
  threads (workers/batch.py), their messages acknowledged late.
- *Outages*: Redis out of reach (an outage, a Sentinel failover) is waited out, trying again every
  :data:`RETRY_MAX` seconds at most, with a line when it starts and one when it ends.
- *Shutdown*: the lane stops popping as the worker begins to shut down (a request popped just then goes back
  to its list), and the worker waits for the requests under way before it frees its models
  (:meth:`InteractiveLane.join`), as Celery's warm shutdown waits for its tasks; a SIGKILL (a container's grace
  period over) ends it anyway, and the readers of its replies get the dead worker's error line.
- *Rolling upgrades*: the lane's lists are ``corral.<digest>.lane``, a name an earlier worker's Celery consumer
  never reads, and the lane also pops the ``corral.<digest>.interactive`` queues where an earlier API sends its
  Celery task messages (:func:`corral.protocol.read_interactive_message` takes them).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from corral.broker import UNREACHABLE
from corral.errors import CorralError, GenerationFailed, WorkerUnavailable
from corral.protocol import (
    InferenceRequest,
    StreamWriter,
    legacy_interactive_queue,
    read_interactive_message,
    waiting_key,
)
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)

POP_TIMEOUT = 1  # seconds a BRPOP waits, so that a stop and newly served models are seen within it
RETRY_START = 0.25  # seconds before the first new try after Redis went out of reach
RETRY_MAX = 2.0  # the most between two tries

# What a reader gets for a request the worker skipped at its start (cancelled, or its reader's lease gone):
# nobody reads it as a rule, but a reader whose lease lapsed while it was alive must not wait for ever.
ABANDONED = WorkerUnavailable("the request was abandoned before it ran: its client went away or stopped "
                              "renewing its reader's lease")


def lane_threads(num_parallel: int) -> int:
    """Threads for interactive requests: every decode slot can stream one, plus two (an embed or a load beside
    full slots, a request that is being skipped)."""
    return max(num_parallel or 8, 1) + 2


def run_request(runtime: WorkerRuntime, payload: dict[str, Any]) -> None:
    """Run one chat/generate/embed/rerank/load request and stream its reply to Redis."""
    req = InferenceRequest.from_payload(payload)
    writer = StreamWriter(runtime.redis, req.request_id, runtime.settings.stream_ttl, leased=req.leased)
    if not writer.claim(runtime.name):  # a copy the API re-sent (corral/protocol.py StreamReader.resend)
        log.info("request %s is running elsewhere already; skipping this copy", req.request_id)
        return
    # one round trip: the event, leaving the model's waiting set, and "was it cancelled?"
    if writer.emit("start", {"worker": runtime.name}, leave=waiting_key(req.model_digest)):
        log.info("request %s was cancelled while queued; skipping", req.request_id)
        writer.fail(ABANDONED)  # a terminal event, should its reader be alive after all (a lapsed lease)
        return
    try:
        try:
            runtime.requests.execute(req, writer)
        except CorralError as exc:
            writer.fail(exc)
        except UNREACHABLE:
            raise
        except Exception as exc:
            log.exception("request %s failed", req.request_id)
            writer.fail(GenerationFailed(f"{type(exc).__name__}: {exc}"))
    except UNREACHABLE as exc:  # Redis went away mid-reply: its reader already tells its client of the outage
        log.warning("request %s stopped: Redis is out of reach (%s: %s)", req.request_id, type(exc).__name__, exc)


class InteractiveLane:
    """Pop interactive requests from the lists of ``runtime.queues`` that end in ``.lane`` (read at every pop,
    so a model the worker starts serving later is included) and run each on a thread of the lane's own."""

    def __init__(self, runtime: WorkerRuntime, threads: int) -> None:
        self.runtime = runtime
        self.threads = threads
        self._free = threading.Semaphore(threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="corral-interactive")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="corral-interactive-lane", daemon=True)
        self._down_since: float | None = None  # since when Redis has not answered the lane
        self._pause = RETRY_START

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Pop no more requests (those under way go on)."""
        self._stop.set()

    def join(self) -> None:
        """Wait for the requests under way to end, however long they take, as Celery's warm shutdown waits for
        its tasks: the worker then frees its models, which a request still running would be using."""
        self.stop()
        self._thread.join()
        for _ in range(self.threads):
            self._free.acquire()
        self._pool.shutdown(wait=True)

    def _queues(self) -> list[str]:
        """The lanes' lists, then the Celery queues an API of an earlier version sends to (a rolling upgrade)."""
        lanes = [q for q in self.runtime.queues if q.endswith(".lane")]
        return lanes + [legacy_interactive_queue(q) for q in lanes]

    def _loop(self) -> None:
        """Pop and hand over, for the worker's life: a pass that fails in any way is logged and tried again, so
        the lane never dies while the heartbeat says the worker serves its models."""
        while not self._stop.is_set():
            if not self._free.acquire(timeout=POP_TIMEOUT):
                continue  # every thread busy: leave the requests to other workers of the model
            handed_over = False
            try:
                handed_over = self._pass()
            except Exception:  # the lane must outlive any hiccup
                log.exception("popping interactive requests failed")
                self._stop.wait(RETRY_MAX)
            finally:
                if not handed_over:
                    self._free.release()

    def _pass(self) -> bool:
        """One pop; True when a request went to a thread (which then releases its permit)."""
        queues = self._queues()
        if not queues:
            self._stop.wait(POP_TIMEOUT)
            return False
        try:
            popped = self.runtime.redis.brpop(queues, timeout=POP_TIMEOUT)
        except UNREACHABLE as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("Redis unreachable (%s: %s): interactive requests wait for it", type(exc).__name__, exc)
            self._stop.wait(self._pause)
            self._pause = min(RETRY_MAX, self._pause * 2)
            return False
        if self._down_since is not None:
            log.warning("Redis answers again after %.1f s: interactive requests resumed",
                        time.monotonic() - self._down_since)
            self._down_since, self._pause = None, RETRY_START
        if not popped:
            return False
        queue, raw = popped
        if self._stop.is_set():  # popped by a BRPOP sent before the stop: back where the next pop takes it
            self._give_back(queue, raw)
            return False
        payload = self._payload(raw)
        if payload is None:
            return False
        try:
            self._pool.submit(self._run, payload)
        except RuntimeError:  # the pool is shut down: the worker is stopping
            self._give_back(queue, raw)
            return False
        return True

    def _give_back(self, queue: bytes | str, raw: bytes | str) -> None:
        try:
            self.runtime.redis.rpush(queue, raw)
        except Exception as exc:  # its reader sends it again when no worker starts it (StreamReader.resend)
            log.warning("could not give back an interactive request at shutdown (%s: %s)", type(exc).__name__, exc)

    def _payload(self, raw: bytes | str) -> dict[str, Any] | None:
        try:
            message = read_interactive_message(raw)
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
            log.error("dropping a malformed interactive message (%s): %.200r", exc, raw)
            return None
        if message.expires < time.time():
            log.info("request %s expired on its queue; skipping", message.payload.get("request_id"))
            return None
        return message.payload

    def _run(self, payload: dict[str, Any]) -> None:
        try:
            run_request(self.runtime, payload)
        except Exception:  # logged, never fatal to the lane's thread
            log.exception("interactive request %s failed", payload.get("request_id"))
        finally:
            self._free.release()

