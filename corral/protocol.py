"""The contract between the API and the workers: queue names, Redis keys, task payloads, stream events.

The API never calls worker code.  It pushes a small JSON message (:func:`interactive_message`) onto the model's
interactive list and reads the reply from a Redis Stream, one per request (batch chunks and model builds are
Celery tasks instead: :data:`CHUNK_TASK`, :data:`BUILD_TASK`)::

    API                          Redis                               worker
    LPUSH <message>      ---->   corral.<digest>.lane         ---->  BRPOP: runs the request (workers/interactive.py)
    XREAD BLOCK <----------      corral:stream:<request id>   <----  XADD start / delta... / done | error
    SET corral:cancel:<id> -->   (client went away)           ---->  checked between tokens: stop
    SET corral:reader:<id> PX -> (renewed by the API process)  ---->  gone (the API died): stop

The reader's lease (renewed by its process: corral/leases.py) covers what a cancel cannot: an API process
killed mid-reply (SIGKILL, a lost host) sends no cancel, and without it the worker would generate to the token
limit for nobody.

Streams (not pub/sub) make the reply replayable: a reader that connects late, or reconnects, loses nothing.
Each stream is capped (MAXLEN) and expires after the request ends.
"""

from __future__ import annotations

import base64
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from corral.errors import BrokerUnavailable, CorralError, WorkerUnavailable, error_for_status
from corral.leases import KEEPER

CHUNK_TASK = "corral.run_chunk"
LEGACY_INTERACTIVE_TASK = "corral.interactive"  # what interactive requests were before the lane (a Celery task)
BUILD_TASK = "corral.build_model"
# Model building that needs llama.cpp (/api/create's load check and quantize): every worker that shares the
# API's model store consumes it (one started with ``--pull-from`` keeps a copy of the store and does not).
BUILD_QUEUE = "corral.build"
STREAM_MAXLEN = 10_000
MAX_RESENDS = 3  # times the API sends an interactive request again whose message was lost (StreamReader)
KEY_PREFIX = "corral:"


def model_queue(model_digest: str, traffic: Literal["interactive", "batch"]) -> str:
    """One model's queue for a traffic class, keyed by the GGUF digest so aliases share workers: a Celery queue
    for batch chunks, and for interactive requests the list the worker's interactive lane pops
    (``corral.<digest>.lane``: a name of its own, so a worker of an earlier version, whose Celery consumer reads
    ``corral.<digest>.interactive``, never meets a message it cannot parse)."""
    return f"corral.{model_digest[:16]}.{'lane' if traffic == 'interactive' else traffic}"


def legacy_interactive_queue(lane: str) -> str:
    """The Celery queue an API of an earlier version sends a lane's interactive requests to (during a rolling
    upgrade): the lane reads it too (:func:`read_interactive_message` takes its Celery messages)."""
    return lane.removesuffix(".lane") + ".interactive"


@dataclass(frozen=True)
class InteractiveMessage:
    """What an interactive list holds: a request's payload (:meth:`InferenceRequest.payload`) and when its
    reader stops waiting for a worker to start it (epoch seconds; a worker drops it after that)."""

    payload: dict[str, Any]
    expires: float


def interactive_message(req: InferenceRequest, queue_timeout: float) -> str:
    return json.dumps({"payload": req.payload(), "expires": req.enqueued_at + queue_timeout})


def read_interactive_message(raw: bytes | str) -> InteractiveMessage:
    """Parse a message of :func:`interactive_message`, or the Celery task message an API of an earlier version
    sent (kombu's envelope: a base64 body of ``[args, kwargs, embed]``, the expiry an ISO time in its headers);
    ``ValueError``/``KeyError``/``TypeError`` for anything else."""
    data = json.loads(raw)
    if "payload" in data:
        payload, expires = data["payload"], float(data["expires"])
    else:
        if data["headers"]["task"] != LEGACY_INTERACTIVE_TASK:
            raise ValueError(f"a task message of {data['headers']['task']!r}")
        args = json.loads(base64.b64decode(data["body"]))[0]
        payload = args[0]
        when = data["headers"].get("expires")
        expires = datetime.fromisoformat(when).timestamp() if when else math.inf
    if not isinstance(payload, dict):
        raise TypeError("the payload is not an object")
    return InteractiveMessage(payload=payload, expires=expires)


def stream_key(request_id: str) -> str:
    return f"{KEY_PREFIX}stream:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"{KEY_PREFIX}cancel:{request_id}"


def started_key(request_id: str) -> str:
    """Taken (SET NX) by the worker that starts the request: a copy re-sent by the API finds it and is skipped."""
    return f"{KEY_PREFIX}started:{request_id}"


def reader_key(request_id: str) -> str:
    """Held (with a TTL, renewed) by the API process reading the reply; its absence means nobody reads."""
    return f"{KEY_PREFIX}reader:{request_id}"


def worker_key(worker_name: str) -> str:
    return f"{KEY_PREFIX}worker:{worker_name}"


WORKER_KEY_PATTERN = f"{KEY_PREFIX}worker:*"
# Hash of worker name -> its last heartbeat state, kept after the heartbeat key expires: a worker that died
# (its key gone, its entry still here) is shown as dead by the operator console.  A worker that stops cleanly
# removes its entry.
WORKERS_SEEN_KEY = f"{KEY_PREFIX}workers:seen"


def waiting_key(model_digest: str) -> str:
    """Sorted set of interactive request ids waiting for a worker, scored by enqueue time."""
    return f"{KEY_PREFIX}waiting:{model_digest[:16]}"


def unload_key(model_digest: str) -> str:
    """Time of the last "unload now" order for a model; workers drop copies loaded before it."""
    return f"{KEY_PREFIX}unload:{model_digest[:16]}"


def chunk_key(chunk_id: str) -> str:
    """Present while a chunk's Celery message is believed to be queued; a flushed Redis loses it.  Its value is
    :data:`QUEUED_MARKER` while the message waits in the queue, then the name of the worker that received it."""
    return f"{KEY_PREFIX}chunk:{chunk_id}"


QUEUED_MARKER = b"1"


def suspect_key(chunk_id: str) -> str:
    """Set when a chunk is re-queued because its worker died running it: the next worker runs it alone, so a
    request that crashes workers takes no other chunk's items down with it again."""
    return f"{KEY_PREFIX}suspect:{chunk_id}"


def job_cancel_key(job_id: str) -> str:
    """Set when a job is cancelled, so a running chunk stops between tokens (SQL stays the truth)."""
    return f"{KEY_PREFIX}jobcancel:{job_id}"


def new_request_id() -> str:
    return uuid.uuid4().hex


class InferenceRequest(BaseModel):
    """Payload of an interactive request: everything a worker needs, nothing Flask- or ORM-shaped."""

    request_id: str
    kind: Literal["generate", "chat", "embed", "rerank", "load"]
    model: str = Field(description="The name the client used (shown by /api/ps).")
    model_digest: str
    prompt: str | None = None
    suffix: str | None = Field(None, description="Fill in the middle: the text after the gap (the prompt is before).")
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[str] | None = Field(None, description="Base64 images, in the order of the text's [img-N] tags.")
    tools: list[dict[str, Any]] | None = None
    inputs: list[str] | None = None
    query: str | None = Field(None, description="rerank: the query every document is scored against.")
    documents: list[str] | None = Field(None, description="rerank: the documents, scored in this order.")
    truncate: bool = True  # generate/chat: drop old messages to fit num_ctx (false: a 400); embed/rerank: cut inputs
    shift: bool = True  # generate/chat: go on past num_ctx by discarding old context (false: stop, "length")
    normalize: bool = True
    dimensions: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    format: str | dict[str, Any] | None = None
    think: bool | str | None = Field(None, description="Thinking on (or a level) for a model that thinks.")
    think_tags: list[str] | None = Field(None, description="The tags around thinking: routed to `thinking`.")
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    keep_alive: float | None = Field(None, description="Seconds; math.inf = forever; None = server default.")
    enqueued_at: float = Field(default_factory=time.time)
    leased: bool = Field(False, description="The API holds a reader lease (reader_key): stop when it lapses.")

    def payload(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        if self.keep_alive is not None and math.isinf(self.keep_alive):
            data["keep_alive"] = -1.0  # JSON has no infinity; negative means forever
        return data

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> InferenceRequest:
        req = cls.model_validate(data)
        if req.keep_alive is not None and req.keep_alive < 0:
            req.keep_alive = math.inf
        return req


# The quantization types /api/create's ``quantize`` takes (llama.cpp's LLAMA_FTYPE_MOSTLY_<name>), and the file
# types it quantizes from: Ollama's F16 and F32, plus BF16 and Q8_0 (requantized, as llama-quantize allows).
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K")
QUANTIZABLE_FROM = ("F16", "F32", "BF16", "Q8_0")


class BuildRequest(BaseModel):
    """Payload of a build task: check that llama.cpp loads a GGUF blob with its LoRA adapter blobs, quantize the
    blob to ``quantize`` (a :data:`QUANT_TYPES` name), or count the prompt tokens of a dry run's ``items`` (of
    ``kind``, under the job's ``options``) on ``model``.  Blobs are named by digest in the shared store."""

    request_id: str
    op: Literal["check", "quantize", "count"]
    model_digest: str
    adapters: list[str] = Field(default_factory=list)
    projectors: list[str] = Field(default_factory=list)
    quantize: str | None = None
    model: str = ""
    kind: str = ""
    items: list[dict[str, Any]] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    leased: bool = Field(False, description="The API holds a reader lease (reader_key): stop when it lapses.")


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a reply stream."""

    kind: Literal["start", "delta", "tools", "progress", "done", "result", "error"]
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.kind in ("done", "result", "error")

    def raise_if_error(self) -> None:
        if self.kind == "error":
            code = self.data.get("code")
            raise error_for_status(int(self.data.get("status", 500)), str(self.data.get("message", "")),
                                   code if isinstance(code, str) else None)


class StreamWriter:
    """Worker side of a reply stream.  Every write also tells whether the client has asked to stop, or (for a
    ``leased`` request) whether the API process reading the reply is gone."""

    def __init__(self, client: redis.Redis, request_id: str, ttl: int, *, leased: bool = False) -> None:
        self.client = client
        self.request_id = request_id
        self.key = stream_key(request_id)
        self.ttl = ttl
        self.leased = leased

    def emit(self, kind: str, data: dict[str, Any], *, leave: str | None = None) -> bool:
        """Append an event; return True when the client has cancelled or its reader is gone.  ``leave``: a
        waiting set (:func:`waiting_key`) the request leaves in the same round trip (the start event does: the
        API would otherwise spend a round trip of its own before the first token)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(self.key, {"e": kind, "d": json.dumps(data)}, maxlen=STREAM_MAXLEN, approximate=True)
        # A stream nobody finishes (the worker was killed) still goes away eventually.
        pipe.expire(self.key, max(self.ttl, 3600) if kind in ("start", "delta") else self.ttl)
        if leave is not None:
            pipe.zrem(leave, self.request_id)
        self._ask(pipe)
        return self._stopped(pipe.execute()[2 if leave is None else 3:])

    def claim(self, worker: str) -> bool:
        """Be the one worker that runs this request (False: a copy of its message is running elsewhere)."""
        return bool(self.client.set(started_key(self.request_id), worker, nx=True, ex=max(self.ttl, 3600)))

    def cancelled(self) -> bool:
        pipe = self.client.pipeline(transaction=False)
        self._ask(pipe)
        return self._stopped(pipe.execute())

    def _ask(self, pipe: Any) -> None:
        pipe.exists(cancel_key(self.request_id))
        if self.leased:
            pipe.exists(reader_key(self.request_id))

    def _stopped(self, answers: list[Any]) -> bool:
        cancelled = bool(answers[0])
        return cancelled or (self.leased and not answers[1])

    def fail(self, error: BaseException) -> None:
        status = error.status_code if isinstance(error, CorralError) else 500
        message = error.message if isinstance(error, CorralError) else f"{type(error).__name__}: {error}"
        data: dict[str, Any] = {"status": status, "message": message}
        if isinstance(error, CorralError) and error.code:
            data["code"] = error.code
        self.emit("error", data)


class StreamReader:
    """API side of a reply stream: yields events, and turns silence into a clear error instead of a hang.

    Before a worker has started the request, the reader waits up to ``queue_timeout``.  Afterwards it keeps
    waiting as long as that worker's heartbeat key lives; a worker killed mid-stream ends the read with
    :class:`WorkerUnavailable` within about ``heartbeat_ttl`` seconds.
    """

    def __init__(self, client: redis.Redis, request_id: str, *, queue_timeout: float, poll: float = 1.0,
                 lease: float | None = None, pickup: float | None = None,
                 resend: Callable[[], bool] | None = None) -> None:
        self.client = client
        self.request_id = request_id
        self.key = stream_key(request_id)
        self.queue_timeout = queue_timeout
        self.poll_ms = int(poll * 1000)
        self.worker: str | None = None
        self.last_id = "0-0"
        # The reader's lease (seconds; None: none, the worker never looks), renewed by the process's keeper
        # (corral/leases.py) whatever the client's pace; at least 3 s, a few renewals' worth
        self.lease = None if lease is None else max(lease, 3.0)
        self._primary: object = None  # the Redis primary the reply is read from (Sentinel: it can change)
        # A message a worker took off the queue and died with (killed, partitioned, lost mid-BRPOP: an early-acked
        # task is gone with it) is never started: after ``pickup`` seconds without a start, ``resend`` may send
        # it again (it says whether it did), at most MAX_RESENDS times; started_key keeps a copy from running twice.
        self.pickup, self.resend, self.resends = pickup, resend, 0
        self._sent = time.monotonic()

    def hold(self, pipe: Any = None) -> None:
        """Take the reader lease, before the request is sent (a worker that starts it finds it held); with
        ``pipe``, as one more command of the caller's pipeline (no round trip of its own)."""
        if self.lease is not None:
            ms = int(self.lease * 1000)
            (pipe or self.client).set(reader_key(self.request_id), b"1", px=ms)
            KEEPER.hold(self.client, reader_key(self.request_id), ms)

    def release(self, pipe: Any = None) -> None:
        """Let the lease go (the reply was read to its end, or the client left): nothing is left to expire."""
        if self.lease is not None:
            KEEPER.drop(reader_key(self.request_id))
            (pipe or self.client).delete(reader_key(self.request_id))

    def events(self) -> Iterator[StreamEvent]:
        deadline = time.monotonic() + self.queue_timeout
        while True:
            reply = self.client.xread({self.key: self.last_id}, block=self.poll_ms, count=256)
            self._same_primary()
            if not reply:
                self._check_alive(deadline)
                continue
            for entry_id, fields in reply[0][1]:
                self.last_id = entry_id
                event = StreamEvent(
                    kind=_text(fields[b"e"]),  # type: ignore[arg-type]
                    data=json.loads(fields[b"d"]),
                )
                if event.kind == "start":
                    self.worker = str(event.data.get("worker"))
                yield event
                if event.terminal:
                    return

    def _same_primary(self) -> None:
        """A reader reconnected to a promoted replica (Sentinel) may miss the stream's unreplicated tail, and then
        wait for a final event that went down with the old primary: the reply ends as an outage instead."""
        primary = getattr(self.client.connection_pool, "master_address", None)
        if self._primary is None:
            self._primary = primary
        elif primary is not None and primary != self._primary:
            raise BrokerUnavailable("Redis failed over to another primary during the reply")

    def _check_alive(self, deadline: float) -> None:
        if self.worker is None:
            now = time.monotonic()
            if (self.resend is not None and self.pickup is not None and self.resends < MAX_RESENDS
                    and now - self._sent > self.pickup and self.resend()):
                self.resends += 1
                self._sent = now
            if time.monotonic() > deadline:
                raise WorkerUnavailable(
                    f"no worker started the request within {self.queue_timeout:g}s; is a worker serving this model?"
                )
        elif not self.client.exists(worker_key(self.worker)):
            raise WorkerUnavailable(f"worker {self.worker} stopped responding while running the request")

    def cancel(self, ttl: int = 3600, pipe: Any = None) -> None:
        """Ask the worker to stop (the client disconnected)."""
        (pipe or self.client).set(cancel_key(self.request_id), b"1", ex=ttl)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
