"""Per-process worker state: settings, store, Redis, loaded models and the heartbeat; requests run through its
:class:`~workers.execution.RequestRunner` (``runtime.requests``).

A :class:`WorkerRuntime` is created once per worker process when Celery says the worker is ready (never at
import, so test collection and the API never load a model).  Its heartbeat thread keeps a short-lived key in
Redis that says "this worker is alive, serves these models and has these loaded"; the API builds /api/ps from
those keys and treats a missing key as a dead worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError

from corral.broker import UNREACHABLE
from corral.modelstore.store import ModelStore
from corral.protocol import WORKERS_SEEN_KEY, unload_key, worker_key
from corral.redis_connection import redis_client
from corral.settings import Settings
from jobs.db import reason, unreachable
from workers.execution import RequestRunner
from workers.registry import ModelRegistry

log = logging.getLogger(__name__)

# The console's "recent tokens/s": tokens generated over the last this many seconds of heartbeats.
RATE_WINDOW = 10.0

# Batch chunks one worker runs at once: two, so the next chunk's prompts fill the decode slots that the last
# one's stragglers leave idle.  Interactive requests never wait for these threads: they have their own.
CHUNKS_PER_WORKER = 2


def task_threads(num_parallel: int) -> int:
    """Celery threads per worker: the chunk runners, and as many again as decode slots for model builds and dry
    runs' token counts (``/v1/messages/count_tokens``), which must not wait one by one behind a quantize.  The
    batch queue gate (workers/queue_gate.py) keeps chunks to their share; interactive requests have threads of
    their own (workers/interactive.py)."""
    return max(num_parallel or 8, 1) + CHUNKS_PER_WORKER + 1


class WorkerRuntime:
    """Everything one worker process needs to serve requests."""

    def __init__(self, settings: Settings, name: str, *, gpu: int | None, queues: list[str], models: list[str],
                 kernels: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.kernels = kernels or {}  # the CPU kernel level llama.cpp runs with (corral/cpu_kernels.py)
        self.name = name
        self.gpu = gpu
        self.queues = queues
        self.models = models
        self.store = ModelStore(settings.models_path)
        self.redis = redis_client(settings.redis)
        self.registry = ModelRegistry(max_loaded=settings.loaded_model_limit, gpu=gpu is not None, on_change=self.publish)
        self.requests = RequestRunner(settings, self.store, self.redis, self.registry, gpu)
        self.started_at = time.time()
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens generated since start) per beat
        self._generated_total = 0
        self._generated_seen = 0
        self._prompt_total = 0
        self._rates: dict[str, float] = {}  # model digest -> tokens/s while its decode loop was busy (dry-run ETAs)
        self._prompt_seen = 0
        self._activity_lock = threading.Lock()  # publish runs on the heartbeat thread and on request threads
        self.chunk_slots = threading.BoundedSemaphore(CHUNKS_PER_WORKER)
        self.solo_chunk = threading.Lock()  # one suspect chunk at a time runs alone (workers/batch.py)
        self._stop = threading.Event()
        self._deferred: deque[tuple[str, Callable[[], object]]] = deque()  # see when_redis_answers
        self._deferred_lock = threading.Lock()
        self._beat: threading.Thread | None = None
        # Extra work for each beat (the batch-job reconciler registers itself here).
        self.periodic: list[tuple[float, Callable[[], object]]] = []

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        self.beat()
        self._beat = threading.Thread(target=self._beat_loop, name="corral-heartbeat", daemon=True)
        self._beat.start()
        # The periodic work (the reconciler's SQL sweep) has a thread of its own: a sweep blocked on a database
        # that is restarting or out of reach (a connect waits 5 s, a query on a lost host up to 20 s) must not
        # stop the heartbeat, or the other workers would take this one for dead and re-run its chunks.
        threading.Thread(target=self._periodic_loop, name="corral-periodic", daemon=True).start()

    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self.redis.delete(worker_key(self.name))
        self.redis.hdel(WORKERS_SEEN_KEY, self.name)  # stopped, not dead
        self.registry.close()

    def _periodic_loop(self) -> None:
        """Run each :attr:`periodic` job every its own seconds.  An outage is waited out with a line when it
        starts and one when it ends (Redis's are the heartbeat's to tell); anything else is logged and retried."""
        interval = max(0.2, self.settings.heartbeat_ttl / 5)
        last_run: dict[int, float] = {}
        down: dict[int, float] = {}  # the periodic jobs the database failed, since when
        while not self._stop.wait(interval):
            for i, (every, job) in enumerate(self.periodic):
                if time.monotonic() - last_run.get(i, 0.0) < every:
                    continue
                last_run[i] = time.monotonic()
                try:
                    job()
                except UNREACHABLE:
                    continue
                except DBAPIError as exc:
                    if not unreachable(exc):
                        log.exception("periodic work failed")
                    elif i not in down:
                        if not down:
                            log.warning("the database is unreachable (%s): the reconciler waits for it; running "
                                        "chunks retry their writes", reason(exc))
                        down[i] = time.monotonic()
                    continue
                except Exception:  # the loop must outlive any hiccup
                    log.exception("periodic work failed")
                    continue
                since = down.pop(i, None)  # only a job the database failed can tell it is back
                if since is not None and not down:
                    log.warning("the database answers again after %.1f s", time.monotonic() - since)

    def _beat_loop(self) -> None:
        interval = max(0.2, self.settings.heartbeat_ttl / 5)
        down_since: float | None = None  # when Redis stopped answering this thread
        while not self._stop.wait(interval):
            try:
                self.beat()
                self.finish_deferred()
            except UNREACHABLE as exc:  # waited out: a line when it starts, one when it ends
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("Redis unreachable (%s: %s): heartbeats, the reconciler and the broker side of chunks "
                                "wait for it; running chunks go on writing to SQL", type(exc).__name__, exc)
                continue
            except Exception:  # the heartbeat must outlive any hiccup
                log.exception("heartbeat failed")
                continue
            if down_since is not None:
                log.warning("Redis answers again after %.1f s: heartbeats resumed", time.monotonic() - down_since)
                down_since = None

    def when_redis_answers(self, what: str, action: Callable[[], object]) -> None:
        """Defer the Redis side of a committed SQL change (a closed chunk's markers and the next dispatch, a
        released chunk's message) that found Redis out of reach: the heartbeat thread runs it, in order, once
        Redis answers again.  SQL already holds the truth; this only tells the broker.  Should the worker die
        first, the reconciler finds the chunk's marker naming a dead worker and re-queues it anyway."""
        with self._deferred_lock:
            self._deferred.append((what, action))

    def finish_deferred(self) -> None:
        """Run the deferred Redis work, oldest first; a Redis error leaves the rest for the next beat."""
        while True:
            with self._deferred_lock:
                if not self._deferred:
                    return
                what, action = self._deferred[0]
            try:
                action()
            except UNREACHABLE:
                raise
            except Exception:  # not Redis's fault: retrying will not help
                log.exception("deferred Redis work failed: %s", what)
            else:
                log.info("done now that Redis answers: %s", what)
            with self._deferred_lock:
                self._deferred.popleft()

    def beat(self) -> None:
        """Publish liveness and loaded models; apply unload orders and keep_alive expiry."""
        digests = sorted(self.registry.loaded_digests())
        orders: dict[str, float] = {}
        if digests:
            values = self.redis.mget([unload_key(d) for d in digests])
            orders = {d: float(v) for d, v in zip(digests, values) if v is not None}
        self.registry.sweep(time.time(), orders)
        self.publish()

    def publish(self) -> None:
        """Write this worker's state (liveness, queues, loaded models) to its heartbeat key."""
        if self._stop.is_set():
            return  # stopping: the key is gone for good
        state = {
            "name": self.name,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu": self.gpu,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cpu_kernels": self.kernels,
            "queues": self.queues,
            "models": self.models,
            "started_at": self.started_at,
            "loaded": self.registry.snapshot(),
            "beat_at": time.time(),
            **self._activity(),
        }
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        text = json.dumps(state)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(worker_key(self.name), text, px=ttl_ms)
        pipe.hset(WORKERS_SEEN_KEY, self.name, text)
        pipe.execute()

    def _activity(self) -> dict[str, Any]:
        """Decode slots busy and in all, tokens/s generated over the last :data:`RATE_WINDOW` seconds, and the
        totals since start of tokens generated and prompt tokens decoded."""
        busy, slots, generated, prompt = self.registry.activity()
        with self._activity_lock:
            # The loops' counts restart when a model unloads: add up the increases only.
            self._generated_total += max(0, generated - self._generated_seen)
            self._generated_seen = generated
            self._prompt_total += max(0, prompt - self._prompt_seen)
            self._prompt_seen = prompt
            now = time.monotonic()
            self._generated.append((now, self._generated_total))
            while len(self._generated) > 2 and now - self._generated[1][0] >= RATE_WINDOW:
                self._generated.popleft()
            first_at, first = self._generated[0]
            span = now - first_at
            rate = (self._generated_total - first) / span if span > 0.5 else 0.0
        for digest, (tokens, seconds) in self.registry.rates().items():
            if tokens >= 64 and seconds >= 1.0:  # enough to go by; kept after the model unloads
                self._rates[digest] = round(tokens / seconds, 1)
        return {"slots": slots, "slots_busy": busy, "tokens_per_second": round(rate, 1), "throughput": dict(self._rates),
                "tokens_generated": self._generated_total, "prompt_tokens_decoded": self._prompt_total}
