"""Build the Celery app from settings: the broker side both the API (which only sends messages) and the workers
(which consume them) share, so neither imports the other.

Choices, each from Celery's docs on long GPU tasks with a Redis broker (see shared/reference):
- ``worker_prefetch_multiplier=1``: a worker reserves no more than it runs, so a chunk message waits in Redis
  for whichever worker frees up first, and queue order (``queue_order_strategy: priority``) decides.
  (Interactive requests are not Celery tasks: the worker's interactive lane pops them, workers/interactive.py.)
- ``task_acks_late`` for batch chunks (a killed worker's chunk is redelivered), early ack for model builds (a
  client that got an error must not have its build re-run minutes later).
- ``visibility_timeout`` far above a chunk's duration, set in every place Celery reads it; lost chunks are
  recovered sooner by the job reconciler, which works from SQL, not from Redis.
- No result backend: results go to Redis streams (interactive) and SQL (batch).
- A Redis outage is waited out, never a reason to exit: ``broker_connection_retry`` with
  ``broker_connection_max_retries=None`` (retry forever; the default gives up after 100 tries, about 50 minutes
  at kombu's 30 s cap, and the worker exits), and ``worker_cancel_long_running_tasks_on_connection_loss=False``
  (said, not left to the default that Celery 6 turns around): a chunk that is running when the connection drops
  goes on, since it writes to SQL, not Redis; its message, which can no longer be acknowledged, comes back and
  finds the chunk taken.  How soon the worker's consumer tries again is the worker's (workers/consumer.py).
- A ``redis+sentinel://`` REDIS_URL becomes kombu's ``sentinel://`` transport with the master name and the
  Sentinels' options among the transport options (:func:`corral.redis_connection.celery_broker`): each new
  broker connection asks the Sentinels where the primary is, so after a failover the consumer's reconnect (the
  same as after an outage) reaches the promoted replica.
"""

from __future__ import annotations

from functools import cached_property

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from corral.protocol import KEY_PREFIX
from corral.redis_connection import celery_broker, redis_client
from corral.settings import Settings

# The errors that mean Redis is out of reach (refused, reset, timed out, still loading its data), from redis-py
# and from kombu's publish, as opposed to a command Redis refused: an outage is waited out, never an item's fault.
UNREACHABLE: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, OperationalError)


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app for ``settings`` and make it the default app of this process."""
    broker, sentinel_options = celery_broker(settings.redis)
    app = Celery("corral", broker=broker, set_as_current=True)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        **sentinel_options,
    }
    app.conf.update(
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=False,
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


# -- taking a stopped job's chunk messages out of the broker ---------------------------------------------------

# Each chunk message carries its job's id in this header (beside the chunk id the task reads), so the messages
# of a cancelled, expired or deleted job can leave the queue they share with every other job of the model.
JOB_HEADER = "corral_job"
# kombu's Redis transport keeps a queue as one list per priority step, named ``queue``, ``queue\x06\x163``, ...
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_UNACKED = "unacked"  # kombu's Redis transport: delivery tag -> a message a consumer holds unacknowledged

# One pass over each list, oldest message first, keeping every message not of the job in its order (popped
# from the tail, pushed on a temporary list's head, which is then renamed back).  Atomic, so a worker's BRPOP
# and a submitter's LPUSH see the list either before or after.  A substring test picks candidates cheaply; the
# JSON header decides.
_PURGE_SCRIPT = """
local job = ARGV[1]
local header = ARGV[2]
local removed = 0
for i = 1, #KEYS, 2 do
  local list, scratch = KEYS[i], KEYS[i + 1]
  redis.call('DEL', scratch)
  local kept = 0
  while true do
    local message = redis.call('RPOP', list)
    if not message then break end
    local drop = false
    if string.find(message, job, 1, true) then
      local ok, decoded = pcall(cjson.decode, message)
      drop = ok and type(decoded) == 'table' and type(decoded['headers']) == 'table'
        and decoded['headers'][header] == job
    end
    if drop then
      removed = removed + 1
    else
      redis.call('LPUSH', scratch, message)
      kept = kept + 1
    end
  end
  if kept > 0 then redis.call('RENAME', scratch, list) end
end
return removed
"""


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps ``queue``'s messages in, one per priority step."""
    return [queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{step}" for step in KOMBU_PRIORITY_STEPS]


def messages_present(client: redis.Redis, queues: set[str], ids: set[str]) -> set[str]:
    """Which of ``ids`` (chunk ids) a message still names: waiting in one of ``queues``' lists, or taken by a
    worker's consumer and kept in kombu's unacked hash until it is acknowledged.  A message is found by its
    argument's text (``argsrepr`` in its headers).  The lists are short (the dispatcher keeps a few chunks per
    live worker released), and so is the hash (each worker holds at most its share of chunks and builds)."""
    if not ids:
        return set()
    pipe = client.pipeline(transaction=False)
    for queue in sorted(queues):
        for name in queue_lists(queue):
            pipe.lrange(name, 0, -1)
    pipe.hvals(KOMBU_UNACKED)
    raws: list[bytes] = []
    for reply in pipe.execute():
        raws.extend(reply)
    return {i for i in ids if any(i.encode() in raw for raw in raws)}


def purge_job_messages(client: redis.Redis, queue: str, job_id: str) -> int:
    """Remove every message of ``job_id`` from ``queue`` (other jobs' messages keep their order); how many."""
    keys: list[str] = []
    for name in queue_lists(queue):
        keys += [name, f"{KEY_PREFIX}purging:{name}"]
    return int(client.eval(_PURGE_SCRIPT, len(keys), *keys, job_id, JOB_HEADER))
