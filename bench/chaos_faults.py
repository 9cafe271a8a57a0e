"""The chaos soak's faults (bench/chaos.py): a seeded loop that breaks the deployment, one fault at a time, and
makes it whole again before the next.

Why one at a time, the other GPU host always up: the soak asks whether corral recovers from each fault while
work runs, not whether it survives losing everything at once; and a fault held while another strikes could not be
told apart in the ledger.  Every 20-40 s the loop draws one of :data:`FAULTS` (``--faults`` picks a subset):

- ``kill-worker``: SIGKILL a GPU host's worker, then start it again;
- ``kill-host``: kill every process on a GPU host (its kernel still closes their connections, so the servers hear
  of it at once), then start its worker again;
- ``lose-host``: a power cut: the host isolated, then every process on it killed, so its connections stay open on
  the servers' side until it rejoins;
- ``partition``: a GPU host cut from ``db`` for longer than the heartbeat TTL; ``isolate``: cut from everyone;
- ``redis-failover``: the Redis primary killed, a replica promoted by the Sentinels, the old primary started
  again as a replica;
- ``postgres-restart``: PostgreSQL on ``db`` stopped (``fast``: sessions ended cleanly; ``immediate``: dropped as
  a crash drops them, with crash recovery at the start), down 5-15 s, then started again at the same address.
  While it is down two job routes are probed (a 503 with ``Retry-After`` is the design, anything else a problem);
  afterwards the loop waits for the first result written after the start, so the note says when jobs resumed.

Each fault goes into the ledger (name, host, start, end, hold, a note) before it strikes, so the chats and
submissions that fail around it are attributed to it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import httpx
from sqlalchemy import text

from bench.chaos_cluster import GPUS, HOSTS, TTL, ChaosCluster
from bench.chaos_ledger import FaultEvent, Ledger, Submitted
from bench.chaos_load import CHAT_MODEL
from harness.cluster import Worker
from harness.stack import wait_for

log = logging.getLogger("bench.chaos")

FAULTS = ("kill-worker", "kill-host", "lose-host", "partition", "isolate", "redis-failover", "postgres-restart")
ON_DB = ("redis-failover", "postgres-restart")  # faults of the db host, not of a GPU host
FAULT_EVERY = (20.0, 40.0)  # seconds between one fault's end and the next one's start
REJOIN_BOUND = 90.0  # seconds for a healed worker to beat again (TCP backoff: up to the cut's length again)
WORKER_START = 180.0
POSTGRES_DOWN = (5.0, 15.0)  # seconds PostgreSQL is gone
RESUME_BOUND = 60.0  # seconds after PostgreSQL's return for a result to be written again
PROBE_TIMEOUT = 10.0  # a job route's answer while PostgreSQL is down (a 503 is immediate)


class Faults:
    """One fault at a time, seeded; each undone, and the deployment whole again, before the next."""

    def __init__(self, cluster: ChaosCluster, ledger: Ledger, rng: random.Random,
                 kinds: tuple[str, ...] = FAULTS) -> None:
        self.kinds = kinds
        self.cluster = cluster
        self.ledger = ledger
        self.rng = rng
        self.network = cluster.network

    def run(self, until: float, stop: threading.Event) -> None:
        while time.monotonic() < until and not stop.is_set():
            if stop.wait(min(self.rng.uniform(*FAULT_EVERY), max(0.0, until - time.monotonic()))):
                return
            if time.monotonic() >= until:
                return
            name, host = self.rng.choice(self.kinds), self.rng.choice(GPUS)
            event = FaultEvent(name, "db" if name in ON_DB else host, time.monotonic())
            with self.ledger.lock:
                self.ledger.faults.append(event)
            log.info("fault: %s on %s", name, event.host)
            strike: Callable[[str, FaultEvent], None] = getattr(self, name.replace("-", "_"))
            try:
                strike(host, event)
            except Exception as exc:  # the harness failed to strike or undo it: say so, and make things whole
                log.exception("fault %s on %s", name, event.host)
                event.note = f"raised {exc!r}"
                self.ledger.problem(f"fault {name} on {event.host} raised {exc!r}")
            finally:
                event.ended = time.monotonic()
            self.whole_again(event)
            log.info("fault %s on %s undone: held %.1f s, %s", name, event.host, event.hold, event.note)

    def _hold(self, low: float, high: float) -> float:
        hold = self.rng.uniform(low, high)
        time.sleep(hold)
        return hold

    # -- a GPU host --------------------------------------------------------------------------------------------

    def kill_worker(self, host: str, event: FaultEvent) -> None:
        worker = self.cluster.workers[host]
        os.kill(worker.proc.proc.pid, signal.SIGKILL)
        worker.proc.stopped(10)
        event.hold = self._hold(3, 10)
        started = time.monotonic()
        self.cluster.start_worker(host, timeout=WORKER_START)
        event.note = f"worker back in {time.monotonic() - started:.1f} s"

    def kill_host(self, host: str, event: FaultEvent) -> None:
        killed = self.cluster.host(host).kill_all()
        self.cluster.workers[host].proc.stopped(10)
        event.hold = self._hold(3, 10)
        started = time.monotonic()
        self.cluster.start_worker(host, timeout=WORKER_START)
        event.note = f"{len(killed)} process(es) killed; worker back in {time.monotonic() - started:.1f} s"

    def lose_host(self, host: str, event: FaultEvent) -> None:
        """A power cut: no FIN or RST leaves the host, so Redis and PostgreSQL keep its connections (a blocked
        BRPOP, an open session) until it rejoins and its kernel, which no longer knows them, resets them."""
        self.network.isolate(host)
        try:
            killed = self.cluster.host(host).kill_all()
            self.cluster.workers[host].proc.stopped(10)
            event.hold = self._hold(TTL + 3, TTL + 10)
        finally:
            self.network.rejoin(host)
        started = time.monotonic()
        self.cluster.start_worker(host, timeout=WORKER_START)
        event.note = f"{len(killed)} process(es) killed; worker back in {time.monotonic() - started:.1f} s"

    def partition(self, host: str, event: FaultEvent) -> None:
        self.network.cut(host, "db")
        try:
            event.hold = self._hold(TTL + 3, TTL + 15)
        finally:
            self.network.heal(host, "db")
        event.note = self._rejoined(host)

    def isolate(self, host: str, event: FaultEvent) -> None:
        self.network.isolate(host)
        try:
            event.hold = self._hold(TTL + 3, TTL + 15)
        finally:
            self.network.rejoin(host)
        event.note = self._rejoined(host)

    def _rejoined(self, host: str) -> str:
        worker = self.cluster.workers[host]
        started = time.monotonic()
        try:
            wait_for(lambda: beating(worker), REJOIN_BOUND, f"{host}'s worker to beat again", interval=0.2)
        except TimeoutError:
            problem = f"{host}'s worker ({worker.name}) did not beat within {REJOIN_BOUND:g} s of the heal; restarted"
            log.warning(problem)
            self.ledger.problem(problem)
            worker.proc.stop(signal.SIGKILL, 10)
            self.cluster.start_worker(host, timeout=WORKER_START)
            return "did not rejoin: restarted"
        if worker.proc.proc.poll() is not None:
            return "exited"
        return f"beat again {time.monotonic() - started:.1f} s after the heal"

    # -- the db host -------------------------------------------------------------------------------------------

    def redis_failover(self, _host: str, event: FaultEvent) -> None:
        sentinel = self.cluster.redis
        old = sentinel.kill_primary()
        new, promoted = sentinel.wait_promoted(old, timeout=60)
        event.hold = self._hold(2, 8)
        sentinel.restart_as_replica(old)
        sentinel.wait_converged(60)
        event.note = f"{new.name} promoted in {promoted:.1f} s"

    def postgres_restart(self, _host: str, event: FaultEvent) -> None:
        """Stop PostgreSQL (fast or immediate, drawn), keep it down for a drawn 5-15 s while the job routes are
        probed, start it again; then wait for the first result written after the start."""
        server = self.cluster.postgres
        mode = self.rng.choice(("fast", "immediate"))
        down_for = self.rng.uniform(*POSTGRES_DOWN)
        before = self._last_write()
        server.stop(mode)
        down_at = time.monotonic()
        try:
            probe = self._probe_job_routes()
            time.sleep(max(0.0, down_at + down_for - time.monotonic()))
        finally:
            event.hold = time.monotonic() - down_at
            server.start()
        up_at = time.monotonic()
        resumed = self._written_after(before, RESUME_BOUND)
        event.note = (f"{mode}, down {event.hold:.1f} s, up in {up_at - down_at - event.hold:.1f} s; {probe}; "
                      + (f"results written again {resumed:.1f} s after the server started" if resumed is not None
                         else f"no result written within {RESUME_BOUND:g} s of the start"))
        if resumed is None:
            self.ledger.problem(f"postgres-restart: no result written within {RESUME_BOUND:g} s of the start")

    def _last_write(self) -> int:
        """The audit trigger's latest row id (0 when there is none or the database does not answer)."""
        from jobs.db import sessions

        try:
            with sessions(self.cluster.settings)() as session:
                return int(session.scalar(text("SELECT coalesce(max(id), 0) FROM chaos_result_writes")) or 0)
        except Exception:
            return 0

    def _written_after(self, row: int, bound: float) -> float | None:
        """Seconds from the server's start to the first result write logged after it (both on the server's clock:
        a write committed between ``row`` and the stop does not count), waiting up to ``bound``; None if none."""
        from jobs.db import sessions

        started = time.monotonic()
        while time.monotonic() - started < bound:
            with contextlib.suppress(Exception):  # the pool's first connections after the start
                with sessions(self.cluster.settings)() as session:
                    delay = session.scalar(text(
                        "SELECT extract(epoch FROM min(at) - pg_postmaster_start_time()) FROM chaos_result_writes"
                        " WHERE id > :row AND at >= pg_postmaster_start_time()"), {"row": row})
                if delay is not None:
                    return float(delay)
            time.sleep(0.5)
        return None

    def _probe_job_routes(self) -> str:
        """``GET /api/jobs/<id>`` and ``POST /api/jobs`` while the database is down (the load submits nothing
        then: it waits on its open jobs, which it cannot read): a 503 with ``Retry-After`` is the design; any other
        answer, or none within :data:`PROBE_TIMEOUT`, is a problem.  A job the POST did make is audited too."""
        with self.ledger.lock:
            job_id = self.ledger.jobs[-1].job_id if self.ledger.jobs else "job_none"
        body = {"kind": "generate", "model": CHAT_MODEL, "items": [{"custom_id": "probe-0", "prompt": "Hi."}],
                "options": {"num_predict": 2}}
        notes = []
        for method, path in (("GET", f"/api/jobs/{job_id}"), ("POST", "/api/jobs")):
            started = time.monotonic()
            try:
                r = httpx.request(method, f"{self.cluster.api_url}{path}", timeout=PROBE_TIMEOUT,
                                  json=body if method == "POST" else None)
            except httpx.HTTPError as exc:
                self.ledger.problem(f"postgres-restart: {method} {path} while down: {type(exc).__name__}")
                notes.append(f"{method} {type(exc).__name__}")
                continue
            took = time.monotonic() - started
            if r.status_code == 202:
                with self.ledger.lock:
                    self.ledger.jobs.append(Submitted("generate", str(r.json()["id"]), ["probe-0"], time.monotonic()))
            if r.status_code != 503 or "retry-after" not in r.headers:
                self.ledger.problem(f"postgres-restart: {method} {path} while down answered {r.status_code}"
                                    f" (Retry-After {r.headers.get('retry-after')}): {r.text[:200]}")
            notes.append(f"{method} {r.status_code} (Retry-After {r.headers.get('retry-after', 'none')})"
                         f" in {took * 1000:.0f} ms")
        return "job routes " + ", ".join(notes)

    # -- whole again -------------------------------------------------------------------------------------------

    def whole_again(self, event: FaultEvent | None = None) -> None:
        """Every cut healed, PostgreSQL up, both workers running and beating (a dead one started again)."""
        for host in HOSTS:
            if self.network.is_isolated(host):
                self.network.rejoin(host)
        for a in HOSTS:
            for b in HOSTS:
                if a < b and self.network.is_cut(a, b):
                    self.network.heal(a, b)
        if self.cluster.postgres.pid() is None:
            self.ledger.problem(f"PostgreSQL was down after {event.name if event else 'the end'}; started")
            try:
                self.cluster.postgres.start()
            except subprocess.SubprocessError as exc:
                self.ledger.problem(f"PostgreSQL did not start: {exc!r}")
        for host in GPUS:
            worker = self.cluster.workers[host]
            if worker.proc.proc.poll() is not None:
                problem = f"{host}'s worker {worker.name} had exited (status {worker.proc.proc.returncode}); restarted"
                log.warning(problem)
                self.ledger.problem(problem)
                self.cluster.start_worker(host, timeout=WORKER_START)
        for host in GPUS:
            worker = self.cluster.workers[host]
            try:
                wait_for(functools.partial(beating, worker), REJOIN_BOUND, f"{host}'s worker to beat", interval=0.2)
            except TimeoutError:
                after = event.name if event else "the end"
                problem = f"{host}'s worker {worker.name} not beating {REJOIN_BOUND:g} s after {after}"
                log.warning(problem)
                self.ledger.problem(problem)


def beating(worker: Worker) -> bool:
    """Whether the worker's heartbeat is in Redis; False while Redis fails over or is out of reach."""
    try:
        return worker.beating()
    except Exception:  # Redis failing over, or out of reach: not yet
        return False
