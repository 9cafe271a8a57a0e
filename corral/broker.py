"""Build the Celery app from settings: the broker side both the API (which only sends messages) and the workers
(which consume them) share, so neither imports the other.

Choices, each from Celery's docs on long GPU tasks with a Redis broker (see shared/reference):
- ``worker_prefetch_multiplier=1``: a worker reserves no more than it runs, so an interactive message is never
  stuck behind a prefetched batch chunk, and queue order (``queue_order_strategy: priority``) decides.
- ``task_acks_late`` for batch chunks (a killed worker's chunk is redelivered), early ack for interactive
  requests (a client that got an error must not have its request re-run minutes later).
- ``visibility_timeout`` far above a chunk's duration, set in every place Celery reads it; lost chunks are
  recovered sooner by the job reconciler, which works from SQL, not from Redis.
- No result backend: results go to Redis streams (interactive) and SQL (batch).
"""

from __future__ import annotations

from functools import cached_property

import redis
from celery import Celery

from corral.protocol import redis_client
from corral.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app for ``settings`` and make it the default app of this process."""
    app = Celery("corral", broker=settings.redis, set_as_current=True)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
    }
    app.conf.update(
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="corral.default",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Celery >= 5.5: on SIGTERM, give a running chunk time to finish before the cold shutdown re-queues it.
        worker_soft_shutdown_timeout=30.0,
        worker_enable_soft_shutdown_on_idle=False,
    )
    app.set_default()
    return app


class Broker:
    """One process's Redis client and Celery app, each made on first use.

    The API's services hold this instead of the two objects, so an app built by ``create_app`` touches neither
    until a request queues work or reads a stream: the API tests of validation, listings and CORS need no Redis.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def redis(self) -> redis.Redis:
        return redis_client(self.settings.redis)

    @cached_property
    def celery(self) -> Celery:
        return make_celery(self.settings)
