"""The worker's Celery consumer: Celery's own, trying again sooner when the broker connection is lost, and
surviving what kombu does with the lost connection afterwards.

Celery's consumer re-establishes a lost broker connection through kombu's ``Connection.ensure_connection`` at
kombu's default pace: 2 s, then 2 s more per try, up to 30 s (``interval_start=2, interval_step=2,
interval_max=30``).  Celery passes no settings for it, so after a 30 s Redis outage a worker slept up to 12 s
more before it looked again (measured: the job resumed 13.8 s after Redis came back).  Refused connections cost
nothing, so this consumer tries every :data:`RETRY_MAX` seconds at most; Celery still logs each try
(``consumer: Cannot connect to ...: Trying again in ...``) and still retries forever
(``broker_connection_max_retries=None``, corral/broker.py).

What is left of a lost connection: Celery first calls its ``collect()``, which detaches the transport from it
(``transport.client = None``), then closes it (``on_connection_error_after_connected``).  From then on, whatever
makes the old channel build a connection pool again raises ``AttributeError: 'NoneType' object has no attribute
'hostname'`` (kombu's ``_connparams`` reads ``transport.client``), which is no connection error, so Celery took it
for an "Unrecoverable error" and the worker process exited.  Two things do (seen on every kill of a
Sentinel-managed primary, tests/integration/test_redis_failover.py):

- the close itself, when the channel's close inside ``collect()`` failed (its BRPOP was in flight and reading it
  raised the connection error kombu swallows there): the second close restores the channel's unacknowledged
  messages through a new pool;
- the acknowledgement of a chunk that was running at the loss and ends after the reconnect (late ack), which
  goes to the channel the message came on: the old one.

The lost connection is thrown away either way (the consumer makes a new one), and what it can no longer say to
Redis is said by Redis itself: a message left unacknowledged is restored from the unacked set after the
visibility timeout, and then finds its chunk done (an interactive one has expired).  So on the lost connection
and its channel those calls log the error and return, and the restart goes on.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)

RETRY_START = 0.5  # seconds before the first new try
RETRY_STEP = 0.5  # added per try
RETRY_MAX = 2.0  # the most between two tries


class Consumer(CeleryConsumer):
    """Celery's consumer with a short reconnect interval and a lost connection's close that cannot kill the
    worker (see the module)."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=RETRY_START, interval_step=RETRY_STEP, interval_max=RETRY_MAX
        )
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            connection.close = functools.partial(_tolerant, connection.close, "closing the lost broker connection")
            channel = getattr(connection, "_default_channel", None)  # the one the task consumer's messages came on
            if channel is not None:
                for name in ("basic_ack", "basic_reject"):
                    setattr(channel, name, functools.partial(_tolerant, getattr(channel, name),
                                                             f"{name} on the lost broker connection"))
        super().on_connection_error_after_connected(exc)


def _tolerant(call: Any, what: str, *args: Any, **kwargs: Any) -> None:
    """``call``, on a lost connection or its channel: kombu's ``AttributeError`` there is no reason to exit."""
    try:
        call(*args, **kwargs)
    except AttributeError as exc:
        log.warning("%s failed (%s); Redis restores what it leaves unacknowledged after the visibility timeout",
                    what, exc)
