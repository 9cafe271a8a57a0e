"""The worker's Celery consumer: Celery's own, trying again sooner when the broker connection is lost.

Celery's consumer re-establishes a lost broker connection through kombu's ``Connection.ensure_connection`` at
kombu's default pace: 2 s, then 2 s more per try, up to 30 s (``interval_start=2, interval_step=2,
interval_max=30``).  Celery passes no settings for it, so after a 30 s Redis outage a worker slept up to 12 s
more before it looked again (measured: the job resumed 13.8 s after Redis came back).  Refused connections cost
nothing, so this consumer tries every :data:`RETRY_MAX` seconds at most; Celery still logs each try
(``consumer: Cannot connect to ...: Trying again in ...``) and still retries forever
(``broker_connection_max_retries=None``, corral/broker.py).
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

RETRY_START = 0.5  # seconds before the first new try
RETRY_STEP = 0.5  # added per try
RETRY_MAX = 2.0  # the most between two tries


class Consumer(CeleryConsumer):
    """Celery's consumer with a short reconnect interval (see the module)."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RETRY_START, interval_step=RETRY_STEP, interval_max=RETRY_MAX
        )
        return super().ensure_connected(conn)
