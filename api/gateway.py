"""The API's only way to reach workers: push an interactive request onto its model's list (or send a Celery
message, for model builds), read the reply stream.

Also the interactive queue bookkeeping: a sorted set per model of requests that wait for a worker, which
gives ``OLLAMA_MAX_QUEUE`` its 503 and /api/ps and the queue endpoints their depth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

from corral.broker import UNREACHABLE, Broker
from corral.errors import BrokerUnavailable, QueueFull, WorkerUnavailable
from corral.protocol import (
    BUILD_QUEUE,
    BUILD_TASK,
    WORKER_KEY_PATTERN,
    WORKERS_SEEN_KEY,
    BuildRequest,
    InferenceRequest,
    StreamEvent,
    StreamReader,
    interactive_message,
    model_queue,
    new_request_id,
    unload_key,
    waiting_key,
)
from corral.settings import Settings

log = logging.getLogger(__name__)


class Gateway:
    """Dispatch interactive requests to the model's queue and follow their replies."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker

    def run(self, req: InferenceRequest) -> Generator[StreamEvent, None, None]:
        """Enqueue ``req`` and yield its reply events until the terminal one.

        Closing the iterator early (the client disconnected) tells the worker to stop.  Redis out of reach, before
        the reply starts or in the middle of it, is a :class:`BrokerUnavailable` (a 503 with ``Retry-After``, or
        an error line in a stream already under way), never a 500 or a hang.
        """
        key = waiting_key(req.model_digest)
        finished = False
        try:
            # The reader's lease lapses a heartbeat TTL after this process stops reading (it was killed): the
            # worker then stops the generation, as it does when a client goes away.
            queue = model_queue(req.model_digest, "interactive")
            req.leased = True
            message = interactive_message(req, self.settings.queue_timeout)

            def send() -> None:  # one LPUSH: a worker's interactive lane pops it (workers/interactive.py)
                self.broker.redis.lpush(queue, message)

            def resend() -> bool:
                """Send again a request no worker started while the queue is empty: its message went with a
                worker that took it and died (a copy that reaches a worker after all is skipped there)."""
                if self.broker.redis.llen(queue):
                    return False  # still waiting its turn, or waiting for a worker
                log.warning("request %s was taken off its queue but never started (its worker died with the "
                            "message); sending it again", req.request_id)
                send()
                return True

            reader = StreamReader(self.broker.redis, req.request_id, queue_timeout=self.settings.queue_timeout,
                                  lease=self.settings.heartbeat_ttl, pickup=2 * self.settings.heartbeat_ttl,
                                  resend=resend)
            self._enter_queue(key, req.request_id, reader)
            try:
                send()
                for event in reader.events():  # the worker takes the request out of the waiting set as it starts
                    # said before the yield: a consumer that has its answer closes the generator there, and a
                    # finished reply must not leave a cancel key behind (an hour of Redis memory, a round trip)
                    finished = finished or event.terminal
                    yield event
                finished = True
            finally:
                with contextlib.suppress(*UNREACHABLE):  # its entry expires with the queue's key anyway
                    pipe = self.broker.redis.pipeline(transaction=False)  # one round trip, after the reply
                    pipe.zrem(key, req.request_id)  # never started (an error, a client gone while it waited)
                    if not finished:
                        reader.cancel(pipe=pipe)
                    reader.release(pipe)
                    pipe.execute()
        except UNREACHABLE as exc:
            raise BrokerUnavailable(exc) from exc

    def loaded(self) -> list[dict[str, Any]]:
        """The models the live workers hold, as /api/ps lists them.  A worker publishes its state when a request
        loads or lets go of a model; between its beats, a model past its expiry or ordered unloaded since it
        loaded (``keep_alive: 0``) is already gone as far as /api/ps is concerned, as in Ollama."""
        entries = [entry for worker in self.workers() for entry in worker.get("loaded", [])]
        digests = sorted({str(e["model_digest"]) for e in entries if e.get("model_digest")})
        orders = dict(zip(digests, self.broker.redis.mget([unload_key(d) for d in digests]))) if digests else {}
        now = time.time()
        shown = []
        for entry in entries:
            expiry, order = entry.get("expires_epoch"), orders.get(entry.get("model_digest", ""))
            if (expiry is not None and expiry <= now) or (order is not None and float(order) >= entry.get("loaded_epoch", 0)):
                continue
            shown.append({k: v for k, v in entry.items() if k not in ("expires_epoch", "model_digest", "loaded_epoch")})
        return shown

    # -- /api/create's llama.cpp work (corral.modelstore.model_create.ModelBuilder) ----------------------------------------

    def check(self, model_digest: str, adapters: list[str], projectors: list[str] | None = None) -> None:
        """Have a worker load the GGUF blob, its adapters and its projectors with llama.cpp; its refusal is a
        :class:`BadRequest`."""
        req = BuildRequest(request_id=new_request_id(), op="check", model_digest=model_digest, adapters=adapters,
                           projectors=projectors or [])
        for _ in self._build(req):
            pass

    def quantize(self, model_digest: str, quant: str) -> Iterator[dict[str, Any]]:
        """Have a worker quantize the GGUF blob: ``{"completed", "total"}`` tensors as it goes, then the new
        blob's ``{"digest", "size"}``."""
        req = BuildRequest(request_id=new_request_id(), op="quantize", model_digest=model_digest, quantize=quant)
        for event in self._build(req):
            yield event.data

    def count_tokens(self, model: str, model_digest: str, kind: str, items: list[dict[str, Any]],
                     options: dict[str, Any]) -> list[int | None]:
        """Have a worker count the prompt tokens of ``items`` as it would render them (a dry run)."""
        req = BuildRequest(request_id=new_request_id(), op="count", model_digest=model_digest, model=model, kind=kind,
                           items=items, options=options)
        counts: list[int | None] = []
        for event in self._build(req):
            if event.kind == "result":
                counts = list(event.data["counts"])
        return counts

    def _build(self, req: BuildRequest) -> Generator[StreamEvent, None, None]:
        reader = StreamReader(self.broker.redis, req.request_id, queue_timeout=self.settings.queue_timeout,
                              lease=self.settings.heartbeat_ttl)
        req.leased = True
        finished = False
        try:
            reader.hold()
            self.broker.celery.send_task(
                BUILD_TASK, args=[req.model_dump()], queue=BUILD_QUEUE, expires=self.settings.queue_timeout
            )
            for event in reader.events():
                finished = finished or event.terminal
                if event.kind != "start":
                    event.raise_if_error()
                    yield event
            finished = True
        except WorkerUnavailable as exc:
            raise WorkerUnavailable(
                f"{exc.message} (checking and quantizing a model needs a worker that shares the model store)"
            ) from exc
        finally:
            with contextlib.suppress(*UNREACHABLE):  # a finished build stays finished whatever Redis does now
                pipe = self.broker.redis.pipeline(transaction=False)
                if not finished:
                    reader.cancel(pipe=pipe)
                reader.release(pipe)
                pipe.execute()

    def _enter_queue(self, key: str, request_id: str, reader: StreamReader) -> None:
        """Join the model's waiting set (and take the reader's lease in the same round trip)."""
        now = time.time()
        pipe = self.broker.redis.pipeline()
        pipe.zremrangebyscore(key, 0, now - self.settings.queue_timeout)  # requests whose API died
        pipe.zadd(key, {request_id: now})
        pipe.zcard(key)
        pipe.expire(key, int(self.settings.queue_timeout * 2) + 1)
        reader.hold(pipe)
        depth = pipe.execute()[2]
        if depth > self.settings.max_queue:
            pipe = self.broker.redis.pipeline(transaction=False)
            pipe.zrem(key, request_id)
            reader.release(pipe)  # refused: nothing to read
            pipe.execute()
            raise QueueFull()

    def waiting(self, model_digest: str) -> int:
        return int(self.broker.redis.zcard(waiting_key(model_digest)))

    def order_unload(self, model_digest: str) -> None:
        """Tell every worker to drop this model now (``keep_alive: 0`` with an empty prompt)."""
        self.broker.redis.set(unload_key(model_digest), repr(time.time()), ex=3600)

    def worker_states(self, forget_after: float = 3600.0) -> list[dict[str, Any]]:
        """Every worker seen within ``forget_after`` seconds, with ``alive`` (its heartbeat key is current) and
        ``beat_age`` (seconds since its last beat): a worker that died stays listed, as dead, for the console.
        One that stopped cleanly took itself off the list."""
        now = time.time()
        live = {w["name"]: w for w in self.workers()}
        states = []
        for raw_name, raw in self.broker.redis.hgetall(WORKERS_SEEN_KEY).items():
            name = raw_name.decode()
            state = live.pop(name, None)
            alive = state is not None
            state = state or json.loads(raw)
            age = now - float(state.get("beat_at") or 0)
            if not alive and age > forget_after:
                self.broker.redis.hdel(WORKERS_SEEN_KEY, name)
                continue
            states.append({**state, "alive": alive, "beat_age": round(max(age, 0.0), 1)})
        states += [{**s, "alive": True, "beat_age": round(max(now - float(s.get("beat_at") or now), 0.0), 1)}
                   for s in live.values()]
        return sorted(states, key=lambda s: (not s["alive"], s["name"]))

    def workers(self) -> list[dict[str, Any]]:
        """Heartbeat states of the live workers."""
        keys = list(self.broker.redis.scan_iter(match=WORKER_KEY_PATTERN, count=500))
        if not keys:
            return []
        return [json.loads(v) for v in self.broker.redis.mget(keys) if v is not None]
