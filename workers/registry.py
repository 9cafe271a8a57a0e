"""Which models a worker process has loaded, for how long, and who may use them now.

One registry per worker process, created lazily (never at import, never in the prefork parent).  Requests take
a model through :meth:`ModelRegistry.use`, which loads it on first use, evicts the least recently used model
past ``OLLAMA_MAX_LOADED_MODELS``, and afterwards sets its expiry from ``keep_alive`` (0 unloads at once).
Requests run on a thread pool: a chat model's decode loop is the single owner of its llama.cpp context and
batches the requests that use it (workers/decode_loop.py), an embedding model serialises its own decodes, and
the registry counts users so that nothing unloads a model a request holds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from corral.broker import UNREACHABLE
from corral.errors import BadRequest
from corral.modelstore.store import ModelName, ModelRecord
from corral.timefmt import local_from_epoch
from workers.engine import LoadedModel, LoadSpec

log = logging.getLogger(__name__)


@dataclass
class Slot:
    spec: LoadSpec
    model: LoadedModel
    record: ModelRecord
    name: str
    loaded_at: float
    expires_at: float
    users: int = 0


class ModelRegistry:
    """Loaded models of one worker process, keyed by their load-time parameters."""

    def __init__(self, *, max_loaded: int, gpu: bool, on_change: Callable[[], None] | None = None) -> None:
        self.max_loaded = max_loaded
        self.gpu = gpu
        # Called after a request loads a model, and after it lets go of one (new expiry, or unloaded): the
        # worker publishes its state then, so /api/ps is current when the request's reply ends.
        self.on_change = on_change or (lambda: None)
        self._slots: OrderedDict[LoadSpec, Slot] = OrderedDict()
        self._meta = threading.Condition()  # guards _slots and users; notified when a model becomes idle
        self._loading = threading.Lock()  # one load (and eviction) at a time

    @contextmanager
    def use(self, spec: LoadSpec, record: ModelRecord, name: str, keep_alive: float) -> Iterator[tuple[LoadedModel, int]]:
        """Yield (model, load nanoseconds: 0 when it was already loaded) for one request.

        Many requests may use one model at once (its decode loop batches them); a model is unloaded only when
        no request uses it.
        """
        load_ns = 0
        slot = self._take(spec)
        if slot is None:
            with self._loading:
                slot = self._take(spec)  # another thread may have loaded it meanwhile
                if slot is None:
                    self._make_room()
                    model = LoadedModel(spec)
                    load_ns = model.load_duration
                    slot = Slot(spec, model, record, name, time.time(), math.inf, users=1)
                    log.info("loaded %s (%s) in %.2fs", name, model.path.name, load_ns / 1e9)
                    with self._meta:
                        self._slots[spec] = slot
                    self._changed()
        with self._meta:
            self._slots.move_to_end(spec)
            slot.name, slot.record, slot.expires_at = name, record, math.inf
        try:
            yield slot.model, load_ns
        finally:
            doomed = False
            with self._meta:
                slot.users -= 1
                if slot.users == 0:
                    slot.expires_at = time.time() + max(keep_alive, 0.0)
                    doomed = keep_alive <= 0
                    self._meta.notify_all()
            if doomed:
                self._unload(spec, only_idle=True)
            self._changed()

    def _changed(self) -> None:
        try:
            self.on_change()
        except UNREACHABLE as exc:  # an outage must not fail the request; the next heartbeat catches up
            log.warning("cannot publish the worker state (%s: %s); the next heartbeat will", type(exc).__name__, exc)
        except Exception:
            log.exception("publishing the worker state failed")
    def _take(self, spec: LoadSpec) -> Slot | None:
        with self._meta:
            slot = self._slots.get(spec)
            if slot is not None:
                slot.users += 1
            return slot

    def _make_room(self) -> None:
        """Unload least recently used idle models until one more fits; wait while all are busy."""
        while True:
            with self._meta:
                if len(self._slots) < self.max_loaded:
                    return
                idle = [spec for spec, slot in self._slots.items() if slot.users == 0]
                if not idle:
                    self._meta.wait(timeout=1.0)
                    continue
            self._unload(idle[0], only_idle=True)

    def _unload(self, spec: LoadSpec, *, only_idle: bool = False) -> None:
        with self._meta:
            slot = self._slots.get(spec)
            if slot is None or (only_idle and slot.users > 0):
                return
            del self._slots[spec]
        slot.model.close()
        log.info("unloaded %s", slot.name)

    def sweep(self, now: float, unload_orders: dict[str, float]) -> None:
        """Unload idle models that expired or were ordered unloaded (``keep_alive: 0``) after they loaded."""
        with self._meta:
            doomed = [
                spec
                for spec, slot in self._slots.items()
                if slot.users == 0
                and (slot.expires_at <= now or unload_orders.get(slot.record.model_digest, 0.0) >= slot.loaded_at)
            ]
        for spec in doomed:
            self._unload(spec, only_idle=True)

    def loaded_digests(self) -> set[str]:
        with self._meta:
            return {slot.record.model_digest for slot in self._slots.values()}

    def activity(self) -> tuple[int, int, int, int]:
        """(decode slots busy, decode slots in all, tokens generated, prompt tokens decoded) over the loaded chat
        models: the operator console's "slots busy" and "recent tokens/s" (the counts restart when a model
        unloads)."""
        with self._meta:
            loops = [slot.model.loop for slot in self._slots.values() if slot.model.loop is not None]
        return (sum(loop.busy for loop in loops), sum(loop.slots for loop in loops),
                sum(loop.generated_total for loop in loops), sum(loop.prompt_decoded_total for loop in loops))

    def rates(self) -> dict[str, tuple[int, float]]:
        """Per loaded chat model (by GGUF digest): tokens generated and seconds its loop spent decoding."""
        with self._meta:
            slots = [slot for slot in self._slots.values() if slot.model.loop is not None]
        return {slot.record.model_digest: (slot.model.loop.generated_total, slot.model.loop.busy_seconds)
                for slot in slots if slot.model.loop is not None}

    def snapshot(self) -> list[dict[str, Any]]:
        """The /api/ps entries for this worker."""
        with self._meta:
            slots = list(self._slots.values())
        return [
            {
                "name": _display(slot.name),
                "model": _display(slot.name),
                "size": slot.record.size,
                "digest": slot.record.digest,
                "details": slot.record.details(),
                "expires_at": local_from_epoch(slot.expires_at),
                "expires_epoch": None if math.isinf(slot.expires_at) else slot.expires_at,
                "size_vram": slot.record.size if self.gpu and slot.spec.n_gpu_layers != 0 else 0,
                "context_length": slot.spec.n_ctx,
                # for the API's own use (not shown): an unload order after this load has taken it away
                "model_digest": slot.record.model_digest,
                "loaded_epoch": slot.loaded_at,
            }
            for slot in slots
        ]

    def close(self) -> None:
        with self._meta:
            specs = list(self._slots)
        for spec in specs:
            self._unload(spec)


def _display(name: str) -> str:
    """Ollama's /api/ps names models in their shortest canonical form (``smollm2:latest``)."""
    try:
        return ModelName.parse(name).display
    except BadRequest:
        return name
