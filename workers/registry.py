"""Which models a worker process has loaded, for how long, and who may use them now.

One registry per worker process, created lazily (never at import, never in the prefork parent).  Requests take
a model through :meth:`ModelRegistry.use`, which loads it on first use, evicts the least recently used model
past ``OLLAMA_MAX_LOADED_MODELS``, and afterwards sets its expiry from ``keep_alive`` (0 unloads at once).
A llama.cpp context is not thread-safe, so one request at a time holds the run lock; the heartbeat thread
only reads a snapshot and unloads models nobody is using.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from corral.errors import BadRequest
from corral.store import ModelName, ModelRecord
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


class ModelRegistry:
    """Loaded models of one worker process, keyed by their load-time parameters."""

    def __init__(self, *, max_loaded: int, gpu: bool) -> None:
        self.max_loaded = max_loaded
        self.gpu = gpu
        self._slots: OrderedDict[LoadSpec, Slot] = OrderedDict()
        self._meta = threading.Lock()  # guards _slots; held briefly
        self._run = threading.RLock()  # held while a request uses a model

    @contextmanager
    def use(self, spec: LoadSpec, record: ModelRecord, name: str, keep_alive: float) -> Iterator[tuple[LoadedModel, int]]:
        """Yield (model, load nanoseconds: 0 when it was already loaded) for one request."""
        with self._run:
            with self._meta:
                slot = self._slots.get(spec)
            load_ns = 0
            if slot is None:
                self._make_room()
                model = LoadedModel(spec)
                load_ns = model.load_duration
                slot = Slot(spec, model, record, name, time.time(), math.inf)
                log.info("loaded %s (%s) in %.2fs", name, spec.path.name, load_ns / 1e9)
            with self._meta:
                self._slots[spec] = slot
                self._slots.move_to_end(spec)
                slot.name, slot.record, slot.expires_at = name, record, math.inf
            try:
                yield slot.model, load_ns
            finally:
                if keep_alive <= 0:
                    self._unload(spec)
                else:
                    slot.expires_at = time.time() + keep_alive

    def _make_room(self) -> None:
        while True:
            with self._meta:
                if len(self._slots) < self.max_loaded:
                    return
                oldest = next(iter(self._slots))
            self._unload(oldest)

    def _unload(self, spec: LoadSpec) -> None:
        with self._meta:
            slot = self._slots.pop(spec, None)
        if slot is not None:
            slot.model.close()
            log.info("unloaded %s", slot.name)

    def sweep(self, now: float, unload_orders: dict[str, float]) -> None:
        """Unload expired models and those ordered unloaded (``keep_alive: 0``) after they were loaded."""
        if not self._run.acquire(blocking=False):
            return  # a request is running; try again at the next beat
        try:
            with self._meta:
                doomed = [
                    spec
                    for spec, slot in self._slots.items()
                    if slot.expires_at <= now
                    or unload_orders.get(slot.record.model_digest, 0.0) >= slot.loaded_at
                ]
            for spec in doomed:
                self._unload(spec)
        finally:
            self._run.release()

    def loaded_digests(self) -> set[str]:
        with self._meta:
            return {slot.record.model_digest for slot in self._slots.values()}

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
