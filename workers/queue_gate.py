"""Stop fetching batch chunks while a worker already runs its share of them.

A worker runs Celery's threads pool for batch chunks and model builds (interactive requests have a lane of
their own: workers/interactive.py); with prefetch that pool would reserve a chunk message for every idle thread.
Chunks held that way would both fill the thread builds need and sit in this worker's unacked set instead of in
the queue where another worker could take them (and where the job reconciler, which works from SQL, expects
them).

Celery has no per-queue concurrency, so this consumer step narrows the queues of each Redis ``BRPOP``: while
:data:`~workers.runtime.CHUNKS_PER_WORKER` chunk tasks are reserved, only the build queue is polled.
The count comes from Celery's own reserved-request set, which is updated when a message is received, before
the next poll.  (Celery's ``worker_disable_prefetch`` does the same kind of narrowing, for all queues at once.)
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.worker import state

from corral.protocol import CHUNK_TASK

log = logging.getLogger(__name__)


def chunks_reserved() -> int:
    return sum(1 for request in list(state.reserved_requests) if request.name == CHUNK_TASK)


class BatchQueueGate(bootsteps.StartStopStep):
    """Consumer step: poll ``*.batch`` queues only while fewer than ``limit`` chunks are reserved."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    limit = 1

    def start(self, c: Any) -> None:
        channel = getattr(c.task_consumer, "channel", None)
        cycle = getattr(channel, "_queue_cycle", None)
        if cycle is None or getattr(cycle, "corral_gated", False):
            if cycle is None:
                log.warning("broker channel has no queue cycle; batch chunks are not gated")
            return
        original = cycle.consume
        limit = self.limit

        def consume(n: int) -> list[str]:
            queues = list(original(n))
            if chunks_reserved() < limit:
                return queues
            return [q for q in queues if not q.endswith(".batch")]

        cycle.consume = consume
        cycle.corral_gated = True


def install(app: Any, limit: int) -> None:
    """Register the gate on ``app``'s worker consumer."""
    BatchQueueGate.limit = limit
    app.steps["consumer"].add(BatchQueueGate)
