"""Issue #38's faults of the shared services, across hosts: a Redis failover, and an API host lost mid-stream.

One deployment over network namespaces (harness/netns.py, harness/cluster.py) serves both tests, module-scoped
(a cluster takes tens of seconds to start): ``db`` runs PostgreSQL and Redis as a primary, a replica and three
Sentinels (every process's ``REDIS_URL`` names the Sentinels); ``api-a`` and ``api-b`` each run ``corral serve``;
``gpu-1`` runs ``corral worker`` and ``gpu-2`` ``corral worker --pull-from`` the API.  The first test leaves the
deployment healed (the old primary follows the new one), the second loses ``api-a`` for good, so they run in
this order.  (The faults of the GPU hosts are in test_multihost.py, in a file of their own so that pytest-xdist
runs the two side by side.)

- Redis failover: the primary (the redis-server on ``db``) is killed mid-job, with the replica in sync; the
  Sentinels promote it.  :func:`tests.helpers.fail_over` sees the failover through (interactive requests meanwhile
  get a 503 with ``Retry-After`` or an error line within a bound, a chat succeeds again within a bound), then
  :func:`tests.helpers.audit`: every item has exactly one result and none failed, nothing is left running, a new
  job runs to its end on both workers, which are the same processes as before.  (The case of a replica that
  lags, whose failover loses writes, runs on loopback: test_redis_failover.py.)
- API host lost mid-stream: ``api-a`` is cut off from everyone and every process on it killed while it streams a
  long generation, so nothing it held is ever closed or cancelled; its reader lease in Redis lapses and the
  worker stops the generation; ``api-b`` goes on serving chats, streams and the polls of a job ``api-a`` took.

Where namespaces cannot be made (not root, no iproute2) the tests skip with the reason; CI sets
``CORRAL_NETNS_REQUIRED=1`` (.ci/run), and there they fail instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.protocol import cancel_key, reader_key
from harness.cluster import HOSTS, Cluster
from harness.netns import Network
from harness.stack import wait_for
from tests.helpers import (
    CANCELLED_BY_CLIENT,
    LONG_GENERATE,
    MODEL,
    SHORT_CHAT,
    audit,
    fail_over,
    listed_workers,
    make_settings,
    require_namespaces,
    submit_job,
)

pytestmark = pytest.mark.slow
ITEMS = 200  # the failover's job: about 15 s of work for both workers on two CPU cores (at NUM_PREDICT)
NUM_PREDICT = 4
CHUNK = 8
TTL = 2.0  # heartbeat_ttl; an API replica's reader lease is max(this, three 1 s polls) = 3 s
WARM = 3 * CHUNK  # items done before the primary is killed: both workers run chunks
POLLED = 16  # the job api-a takes just before it is lost, polled through api-b
# Seconds from api-a's loss to the worker stopping its generation: the lease, then the worker's next look at it
# (2000 tokens would take about 25 s more).
STOP_BOUND = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Cluster]:
    """The deployment above, its two API replicas and both workers up; everything removed on the way out."""
    require_namespaces()
    root = tmp_path_factory.mktemp("faults")
    base = make_settings(root / "home", None, models_dir, heartbeat_ttl=TTL, reconcile_interval=1.0,
                         chunk_size=CHUNK, queue_timeout=120.0)
    network = Network(HOSTS)
    with network, Cluster(network, base, root / "cluster", with_sentinel=True) as deployed:
        started = time.monotonic()
        second = deployed.spawn_api("api-b")  # beside the others: its start costs no wall time of its own
        deployed.start_all()
        second(180)
        print(f"\ncluster on {network.subnet} (Redis behind Sentinels, two API replicas): up in "
              f"{time.monotonic() - started:.1f} s")
        yield deployed
    assert network.leftovers() == [], "the network must be gone, pass or fail"


def test_redis_failover_across_hosts(cluster: Cluster) -> None:
    """The Redis primary on ``db`` killed mid-job while both GPU hosts work on it and a reply streams from
    ``api-a``: nothing lost, nothing run to two results, no worker process lost, and the clients' errors clear
    and short."""
    assert cluster.sentinel is not None
    workers = list(cluster.workers.values())
    pids = [worker.proc.proc.pid for worker in workers]
    submitted = time.monotonic()
    job_id = submit_job(cluster.api_url, ITEMS, "item", num_predict=NUM_PREDICT)
    report = fail_over(cluster.api_url, cluster.sentinel, cluster.settings, job_id, warm=WARM)
    chunks = audit(cluster.api_url, cluster.settings, job_id, ITEMS, "item")
    print(f"job of {ITEMS} items: {time.monotonic() - submitted:.1f} s from submission to the audit's end; the new "
          f"job's chunks per worker: {dict(chunks)}")
    logs = [worker.proc.output() for worker in workers]
    if report.stranded:  # their messages went with the primary: the reconciler, not luck, brought them back
        assert any("re-enqueueing" in log for log in logs), f"chunks {report.stranded} were never re-enqueued"
    # Both workers lived through it, as the same processes, and both serve.
    assert [worker.proc.proc.pid for worker in workers] == pids
    assert all(worker.proc.proc.poll() is None for worker in workers)
    # (Celery logs, with a traceback, the acks it could not send while Redis was gone: not a worker's death.)
    assert not any("Unrecoverable error" in log for log in logs)
    assert listed_workers(cluster.api_url) == {worker.name for worker in workers}
    assert all(chunks[worker.name] > 0 for worker in workers), chunks


def test_api_host_lost_mid_stream(cluster: Cluster) -> None:
    """``api-a`` lost (isolated, then every process on it killed) while it streams a 2000-token generation: the
    worker stops that generation once the replica's lease lapses, and ``api-b`` serves chats, streams and the
    polls of a job ``api-a`` took."""
    a, b = cluster.api_url, cluster.url_of("api-b")
    redis = cluster.stack("api-b").redis
    workers = list(cluster.workers.values())
    logged = {worker.host: len(worker.proc.output()) for worker in workers}  # what they log from now on counts
    api = cluster.stack("api-a").procs[-1]
    cancels = set(redis.scan_iter(match=cancel_key("*")))  # a failover before may have left some (an hour's TTL)
    job_id = submit_job(a, POLLED, "polled")
    with httpx.stream("POST", a + "/api/generate", json=LONG_GENERATE, timeout=60) as reply:
        # Held until the block ends: a line iterator dropped at the break is finalized at once, and httpcore
        # closes the connection with it, which api-a reads as its client leaving (a cancel, not a lost replica).
        lines = reply.iter_lines()
        for i, _ in enumerate(lines):
            if i == 3:
                break
        [lease] = list(redis.scan_iter(match=reader_key("*")))  # api-a holds its reader's lease
        lost_at = time.monotonic()
        cluster.network.isolate("api-a")  # nothing it sends from now on arrives: no renewal, no cancel, no FIN
        killed = cluster.host("api-a").kill_all()
    assert api.proc.pid in killed and api.stopped(10) == -9
    r = httpx.post(b + "/api/chat", json={**SHORT_CHAT, "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    answered_in = time.monotonic() - lost_at  # api-b serves at once

    found: list[tuple[str, str, str]] = []

    def stopped() -> list[tuple[str, str, str]]:
        found[:] = [(worker.host, *match) for worker in workers
                    for match in CANCELLED_BY_CLIENT.findall(worker.proc.output()[logged[worker.host]:])]
        return found

    wait_for(stopped, STOP_BOUND, "a worker to stop the lost replica's generation", interval=0.1)
    stopped_in = time.monotonic() - lost_at
    assert not list(redis.scan_iter(match=reader_key("*")))  # the lease lapsed; nothing is left behind
    [(host, request_id, tokens)] = found
    assert lease.decode().endswith(f":{request_id}")  # the generation stopped is the one api-a streamed

    # api-b serves, from the same workers, and its own replies are read to the end (its leases hold).
    r = httpx.post(b + "/api/chat", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": False,
        "options": {"num_predict": 64, "temperature": 0}})
    assert r.status_code == 200 and r.json()["eval_count"] == 64, r.text
    with httpx.stream("POST", b + "/api/generate", timeout=60,
                      json={**LONG_GENERATE, "options": {"num_predict": 8}}) as streamed:
        assert json.loads(list(streamed.iter_lines())[-1])["done"] is True
    chunks = audit(b, cluster.settings, job_id, POLLED, "polled", after=2 * CHUNK)  # polled through api-b
    print(f"\napi host lost: {len(killed)} process(es) on api-a killed; {host} stopped its generation "
          f"{stopped_in:.1f} s after the loss, after {tokens} of 2000 tokens (lease {max(TTL, 3.0):g} s); api-b "
          f"answered a chat {answered_in:.1f} s after the loss; the new job's chunks per worker: {dict(chunks)}")
    assert int(tokens) < 2000
    assert sum(len(CANCELLED_BY_CLIENT.findall(worker.proc.output()[logged[worker.host]:])) for worker in workers) == 1
    # replies read to their end leave neither a lease nor a cancel key behind
    assert not list(redis.scan_iter(match=reader_key("*"))) and set(redis.scan_iter(match=cancel_key("*"))) == cancels
    assert all(worker.proc.proc.poll() is None for worker in workers)
    assert listed_workers(b) == {worker.name for worker in workers}
