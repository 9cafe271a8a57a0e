"""A chaos soak (issue #38 item 3): mixed work on the multi-host harness while a loop breaks it, then an audit.

Why: the fault tests (tests/integration/test_multihost.py, test_redis_failover.py) each break one thing once, on
one job.  A deployment meets many faults, one after another, while chats, jobs and batches of every kind run.
This bench runs that for N minutes and says whether anything was lost or done twice, how interactive requests
fared, and whether any process's memory or descriptors grew.

How: the deployment of :mod:`harness.cluster` (``db``: PostgreSQL and Redis; ``api-a``: ``corral serve``;
``gpu-1``: ``corral worker``; ``gpu-2``: ``corral worker --pull-from`` the API), each host a network namespace,
except that Redis on ``db`` is a primary, a replica and three Sentinels (:mod:`harness.redis_sentinel`) and every
process's ``REDIS_URL`` is ``redis+sentinel://``: :class:`ChaosCluster` subclasses ``Cluster`` for that alone.

- Load (a few threads, modest for 2 cores): chats on ``/api/chat`` (half streamed), latency measured; generate
  jobs (``/api/jobs``, tens of items, tiny ``num_predict``); embed jobs (all-minilm); OpenAI batches (a JSONL
  uploaded to ``/v1/files``, then ``/v1/batches`` of ``/v1/chat/completions`` lines).  Each job kind keeps at
  most one or two jobs open, so the backlog stays bounded.
- Faults (seeded, one at a time, every 20-40 s, each undone after a few seconds; the other GPU host is always
  up): SIGKILL a worker (then start it again); kill every process on a GPU host (``kill_all``: its kernel still
  closes their connections, so the servers hear of it at once); lose a GPU host as a power cut does (isolated,
  then every process killed, so its connections stay open on the servers' side until it rejoins); cut a GPU host
  from ``db`` for longer than the heartbeat TTL, or isolate it from everyone; fail Redis over (kill the primary,
  wait for the promotion, start the old primary again as a replica).  ``--faults`` picks a subset.
- End: faults stopped and undone, load stopped, every submitted job waited for (bounded), then the audit, from
  SQL: per submitted item exactly one row and one result.  A PostgreSQL trigger the bench adds to its own
  database logs every transition of an item into ``succeeded`` or ``failed`` (a result written: the worker's
  conditional write, jobs/transitions.py ``write_result``), so an item whose result was written twice is seen
  even if the second write overwrote the first.  ``lost``: an item with no row, or not ended, or succeeded with
  no result; ``duplicated``: an item with two rows, or two result writes, or listed twice by the results route.
  Interactive requests: sent, failed (by reason, with the fault active around them), p50/p95.  Each process's
  RSS and open descriptors at the start (after the warm-up) and at the end; a process the loop restarted shows
  its first incarnation's start and its last incarnation's end, marked.

Run (root: network namespaces), without the suite's Redis and database::

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.chaos --minutes 15 [--seed S]

Everything it started (processes, namespaces, the bridge) is removed at the end, pass or fail, Ctrl-C included;
its logs are kept under the printed directory only with ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
from sqlalchemy import create_engine, select, text

from bench.common import print_table
from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.cluster import HOSTS, LOG_SETTINGS, Cluster, Worker, _schema_of_pgoptions, missing
from harness.netns import Network, can_make_namespaces
from harness.processes import free_port, redis_reachable
from harness.redis_sentinel import SentinelCluster
from harness.stack import fresh_database, wait_for

log = logging.getLogger("bench.chaos")

CHAT_MODEL = "smollm2"
EMBED_MODEL = "all-minilm"
GPUS = ("gpu-1", "gpu-2")
TTL = 2.0  # heartbeat_ttl: as the multi-host tests
CHUNK = 8  # items per chunk
NUM_PREDICT = 6
FAULT_EVERY = (20.0, 40.0)  # seconds between one fault's end and the next one's start
WARMUP_BOUND = 180.0  # seconds for the first jobs to end before the faults start
DRAIN_BOUND = 420.0  # seconds for every submitted job to end once the faults stop
REJOIN_BOUND = 90.0  # seconds for a healed worker to beat again (TCP backoff: up to the cut's length again)
WORKER_START = 180.0
QUEUE_TIMEOUT = 120.0  # an interactive request waits this long for a worker, then a 503 (the default: 600)
CHAT_TIMEOUT = QUEUE_TIMEOUT + 30  # above it: the API's own answer is what is counted
RECENT = 15.0  # a request ending this long after a fault's end counts as "during" it
FAULTS = ("kill-worker", "kill-host", "lose-host", "partition", "isolate", "redis-failover")
AUDIT_DDL = """
CREATE TABLE chaos_result_writes (
    id bigserial PRIMARY KEY, item_id bigint NOT NULL, job_id text NOT NULL, old_state text, new_state text,
    claim text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX chaos_result_writes_item ON chaos_result_writes (item_id);
CREATE FUNCTION chaos_result_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_result_writes (item_id, job_id, old_state, new_state, claim)
    VALUES (NEW.id, NEW.job_id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END, NEW.state,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.claim END);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_result_update AFTER UPDATE ON job_items FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN ('succeeded', 'failed'))
    EXECUTE FUNCTION chaos_result_write();
CREATE TRIGGER chaos_result_insert AFTER INSERT ON job_items FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed'))
    EXECUTE FUNCTION chaos_result_write();
"""


# -- the deployment -------------------------------------------------------------------------------------------

@dataclass
class ChaosCluster(Cluster):
    """:class:`harness.cluster.Cluster` with Redis on ``db`` as a Sentinel-managed primary and replica (the
    processes' ``REDIS_URL`` names the three Sentinels), and the result-write audit trigger in its database."""

    sentinel: SentinelCluster = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        db = self.host("db")
        self.sentinel = SentinelCluster(self.root / "redis", db.ip, prefix=db.prefix)

    @property
    def redis_url(self) -> str:  # type: ignore[override]
        return self.sentinel.url()

    def _start_db(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sentinel.start()
        self.postgres.init()
        with open(self.postgres.data_dir / "postgresql.conf", "a") as conf:
            conf.write(LOG_SETTINGS.replace("log_statement = 'mod'", "log_statement = 'none'"))
        with open(self.postgres.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.network.subnet} trust\n")
        self.postgres.start()
        self.postgres.create_database("corral")
        wait_for(lambda: redis_reachable(self.redis_url, timeout=0.5), 20, "Redis (Sentinels) on db")
        _schema_of_pgoptions(self.settings.database)
        fresh_database(self.settings)
        engine = create_engine(self.settings.database)
        try:
            with engine.begin() as conn:
                conn.execute(text(AUDIT_DDL))
        finally:
            engine.dispose()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sentinel.stop()


# -- what was sent, and what came of it -----------------------------------------------------------------------

@dataclass
class Submitted:
    kind: str  # generate, embed, batch
    job_id: str
    custom_ids: list[str]
    at: float


@dataclass
class Interactive:
    stream: bool
    started: float
    ended: float
    outcome: str  # "ok", or why it failed
    fault: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class FaultEvent:
    name: str
    host: str
    started: float
    ended: float = 0.0
    hold: float = 0.0
    note: str = ""


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: list[Submitted] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    chats: list[Interactive] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fault_around(self, started: float, ended: float) -> str:
        """The first fault active while a request ran (or undone less than :data:`RECENT` s before it started),
        with its host; "none" when there was none."""
        with self.lock:
            hit = [f for f in self.faults if f.started <= ended and started <= (f.ended or ended) + RECENT]
        return f"{hit[0].name} {hit[0].host}" if hit else "none"


# -- processes: RSS and descriptors ---------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _pss(pid: int) -> float:
    """The process's proportional set size in KiB (shared pages split among their users: a sum over processes
    that share memory, PostgreSQL's backends, counts it once), 0 where the kernel does not say."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _stats(pids: list[int]) -> tuple[float, int, int, float] | None:
    """(RSS MiB, open descriptors, processes, PSS MiB) summed over ``pids`` (those still alive)."""
    rss, fds, alive, pss = 0.0, 0, 0, 0.0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            if "\nState:\tZ" in status:
                continue
            kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            count = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, ValueError):
            continue
        rss, fds, alive, pss = rss + kib / 1024, fds + count, alive + 1, pss + _pss(pid) / 1024
    return (rss, fds, alive, pss) if alive else None


@dataclass
class Sample:
    pid: int
    rss: float
    fds: int
    procs: int
    at: float
    pss: float = 0.0


@dataclass
class Watch:
    """Each process's samples, by role, per incarnation (pid)."""

    cluster: ChaosCluster
    samples: dict[str, dict[int, list[Sample]]] = field(default_factory=lambda: defaultdict(dict))
    marks: dict[str, dict[str, Sample]] = field(default_factory=lambda: defaultdict(dict))

    def roles(self) -> dict[str, list[int]]:
        """role -> the pids it stands for now (a tree: the process and its children, where it has any)."""
        found: dict[str, list[int]] = {}
        api = self.cluster.stacks.get("api-a")
        if api and api.procs and api.procs[0].proc.poll() is None:
            found["api-a: corral serve"] = [api.procs[0].proc.pid, *_children(api.procs[0].proc.pid)]
        for host in GPUS:
            worker = self.cluster.workers.get(host)
            if worker and worker.proc.proc.poll() is None:
                found[f"{host}: corral worker"] = [worker.proc.proc.pid, *_children(worker.proc.proc.pid)]
        for node in [*self.cluster.sentinel.servers, *self.cluster.sentinel.sentinels]:
            pid = node.pid()
            if pid is not None:
                found[f"db: {node.name}"] = [pid]
        postmaster = self.cluster.postgres.pid()
        if postmaster is not None:
            found["db: postgres (postmaster)"] = [postmaster]
            backends = _children(postmaster)
            if backends:
                found["db: postgres (all processes)"] = [postmaster, *backends]
        return found

    def sample(self, mark: str | None = None) -> None:
        now = time.monotonic()
        for role, pids in self.roles().items():
            got = _stats(pids)
            if got is None:
                continue
            # the postgres rows stand for a set whose members come and go: one incarnation, the postmaster's
            sample = Sample(pids[0], got[0], got[1], got[2], now, got[3])
            self.samples[role].setdefault(pids[0], []).append(sample)
            if mark:
                self.marks[mark][role] = sample

    def rows(self) -> list[list[Any]]:
        rows = []
        for role in sorted(self.samples):
            incarnations = self.samples[role]
            first = self.marks["start"].get(role) or next(iter(incarnations.values()))[0]
            last = self.marks["end"].get(role)
            every = [s for run in incarnations.values() for s in run]
            restarted = len(incarnations) - 1
            name = role + (f" (restarted {restarted}x; last up {(last.at - next(iter(incarnations[last.pid])).at) / 60:.0f} min)"
                           if restarted and last else "")
            rows.append([
                name, f"{first.pid}" + (f" -> {last.pid}" if last and last.pid != first.pid else ""),
                f"{first.rss:.0f}", f"{last.rss:.0f}" if last else "gone", f"{max(s.rss for s in every):.0f}",
                f"{first.pss:.0f}", f"{last.pss:.0f}" if last else "gone",
                first.fds, last.fds if last else "gone", max(s.fds for s in every),
                f"{first.procs} / {last.procs}" if last else first.procs,
            ])
        return rows


# -- load -----------------------------------------------------------------------------------------------------

class Load:
    """The client threads; each stops after its current request once ``stop`` is set."""

    def __init__(self, cluster: ChaosCluster, ledger: Ledger, seed: int) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.seed = seed
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.serial = 0
        self.serial_lock = threading.Lock()
        from jobs.db import sessions

        self.sessions = sessions(cluster.settings)

    def start(self) -> None:
        plans: list[tuple[str, Callable[[random.Random], None]]] = [
            ("chat-1", self.chats), ("chat-2", self.chats), ("generate", self.generate_jobs),
            ("embed", self.embed_jobs), ("batch", self.batches),
        ]
        for n, (name, target) in enumerate(plans):
            rng = random.Random(self.seed * 100 + n)
            thread = threading.Thread(target=self._guard, args=(name, target, rng), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self, timeout: float) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def _guard(self, name: str, target: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            target(rng)
        except Exception as exc:  # a bug of the bench's own: say so, do not hide it
            log.exception("load thread %s died", name)
            with self.ledger.lock:
                self.ledger.problems.append(f"load thread {name} died: {exc!r}")

    def _next(self) -> int:
        with self.serial_lock:
            self.serial += 1
            return self.serial

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.cluster.api_url, timeout=httpx.Timeout(60.0, connect=10.0))

    # interactive
    def chats(self, rng: random.Random) -> None:
        with self._client() as client:
            while not self.stop.is_set():
                stream = rng.random() < 0.5
                n = self._next()
                body = {"model": CHAT_MODEL, "stream": stream, "options": {"num_predict": 8, "temperature": 0.7},
                        "messages": [{"role": "user", "content": f"Say something about the number {n}."}]}
                started = time.monotonic()
                outcome = self._chat(client, body, stream)
                ended = time.monotonic()
                record = Interactive(stream, started, ended, outcome, self.ledger.fault_around(started, ended))
                with self.ledger.lock:
                    self.ledger.chats.append(record)
                if outcome != "ok":
                    log.info("chat %s (stream=%s) failed after %.1f s: %s [%s]", n, stream, record.seconds,
                             outcome, record.fault)
                self.stop.wait(rng.uniform(0.5, 2.0))

    @staticmethod
    def _chat(client: httpx.Client, body: dict[str, Any], stream: bool) -> str:
        try:
            with client.stream("POST", "/api/chat", json=body, timeout=CHAT_TIMEOUT) as r:
                if r.status_code != 200:
                    r.read()
                    return f"HTTP {r.status_code}: {_error_text(r.text)}"
                lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        except json.JSONDecodeError:
            return "a line that is not JSON"
        for line in lines:
            if "error" in line:
                return f"{'stream ' if stream else ''}error: {_error_text(json.dumps(line))}"
        if not lines or not lines[-1].get("done"):
            return "ended without done"
        return "ok"

    # jobs
    def _open(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` whose job has not ended (SQL: the truth)."""
        if not ids:
            return []
        from jobs.models import Job
        from jobs.states import JobStatus

        try:
            with self.sessions() as session:
                ended = set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.status.in_(JobStatus.TERMINAL))))
        except Exception:  # the database's host cut from the bench: count them open
            return ids
        return [i for i in ids if i not in ended]

    def _jobs_loop(self, rng: random.Random, kind: str, at_once: int,
                   submit: Callable[[httpx.Client, random.Random], Submitted | None]) -> None:
        mine: list[str] = []
        with self._client() as client:
            while not self.stop.is_set():
                mine = self._open(mine)
                if len(mine) < at_once:
                    try:
                        job = submit(client, rng)
                    except httpx.HTTPError as exc:
                        job = None
                        self._refuse(kind, type(exc).__name__)
                    if job is not None:
                        mine.append(job.job_id)
                        with self.ledger.lock:
                            self.ledger.jobs.append(job)
                self.stop.wait(rng.uniform(1.0, 3.0))

    def _refuse(self, kind: str, why: str) -> None:
        log.info("%s submission refused: %s", kind, why)
        with self.ledger.lock:
            self.ledger.refused[f"{kind}: {why}"] += 1

    def _post_job(self, client: httpx.Client, kind: str, label: str, body: dict[str, Any]) -> Submitted | None:
        r = client.post("/api/jobs", json=body)
        if r.status_code != 202:
            self._refuse(label, f"HTTP {r.status_code}: {_error_text(r.text)}")
            return None
        return Submitted(label, str(r.json()["id"]), [str(i["custom_id"]) for i in body["items"]], time.monotonic())

    def generate_jobs(self, rng: random.Random) -> None:
        def submit(client: httpx.Client, rng: random.Random) -> Submitted | None:
            n, count = self._next(), rng.randint(20, 40)
            items = [{"custom_id": f"g{n}-{i}", "prompt": f"Job {n}: count to {i}."} for i in range(count)]
            return self._post_job(client, "generate", "generate", {
                "kind": "generate", "model": CHAT_MODEL, "items": items,
                "options": {"num_predict": rng.randint(3, NUM_PREDICT), "temperature": 0}})

        self._jobs_loop(rng, "generate", 2, submit)

    def embed_jobs(self, rng: random.Random) -> None:
        def submit(client: httpx.Client, rng: random.Random) -> Submitted | None:
            n, count = self._next(), rng.randint(30, 60)
            items = [{"custom_id": f"e{n}-{i}", "input": f"Document {i} of set {n}: " + " ".join(
                rng.choice(WORDS) for _ in range(rng.randint(5, 30)))} for i in range(count)]
            return self._post_job(client, "embed", "embed", {"kind": "embed", "model": EMBED_MODEL, "items": items})

        self._jobs_loop(rng, "embed", 1, submit)

    def batches(self, rng: random.Random) -> None:
        def submit(client: httpx.Client, rng: random.Random) -> Submitted | None:
            n, count = self._next(), rng.randint(8, 16)
            ids = [f"b{n}-{i}" for i in range(count)]
            body = "".join(json.dumps({
                "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": CHAT_MODEL, "max_tokens": rng.randint(3, NUM_PREDICT), "temperature": 0,
                         "messages": [{"role": "user", "content": f"Batch {n}, request {i}: name a colour."}]},
            }) + "\n" for i, custom_id in enumerate(ids)).encode()
            r = client.post("/v1/files", files={"file": (f"batch-{n}.jsonl", body, "application/jsonl")},
                            data={"purpose": "batch"})
            if r.status_code != 200:
                self._refuse("batch", f"upload HTTP {r.status_code}: {_error_text(r.text)}")
                return None
            r = client.post("/v1/batches", json={"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
                                                 "completion_window": "24h"})
            if r.status_code != 200:
                self._refuse("batch", f"HTTP {r.status_code}: {_error_text(r.text)}")
                return None
            batch = r.json()
            if batch.get("status") == "failed":
                self._refuse("batch", f"failed at creation: {_error_text(json.dumps(batch.get('errors')))}")
                return None
            return Submitted("batch", str(batch["id"]), ids, time.monotonic())

        self._jobs_loop(rng, "batch", 1, submit)


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud garden").split()


def _error_text(body: str) -> str:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, TypeError):
        return body.strip()[:80]
    if isinstance(value, dict):
        err = value.get("error", value)
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:80]
    return str(value)[:80]


# -- faults ---------------------------------------------------------------------------------------------------

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
            event = FaultEvent(name, host if name != "redis-failover" else "db", time.monotonic())
            with self.ledger.lock:
                self.ledger.faults.append(event)
            log.info("fault: %s on %s", name, event.host)
            try:
                getattr(self, name.replace("-", "_"))(host, event)
            finally:
                event.ended = time.monotonic()
            self.whole_again(event)
            log.info("fault %s on %s undone: held %.1f s, %s", name, event.host, event.hold, event.note)

    def _hold(self, low: float, high: float) -> float:
        hold = self.rng.uniform(low, high)
        time.sleep(hold)
        return hold

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
            wait_for(lambda: _beating(worker), REJOIN_BOUND, f"{host}'s worker to beat again", interval=0.2)
        except TimeoutError:
            problem = f"{host}'s worker ({worker.name}) did not beat within {REJOIN_BOUND:g} s of the heal; restarted"
            log.warning(problem)
            with self.ledger.lock:
                self.ledger.problems.append(problem)
            worker.proc.stop(signal.SIGKILL, 10)
            self.cluster.start_worker(host, timeout=WORKER_START)
            return "did not rejoin: restarted"
        if worker.proc.proc.poll() is not None:
            return "exited"
        return f"beat again {time.monotonic() - started:.1f} s after the heal"

    def redis_failover(self, _host: str, event: FaultEvent) -> None:
        sentinel = self.cluster.sentinel
        old = sentinel.kill_primary()
        new, promoted = sentinel.wait_promoted(old, timeout=60)
        event.hold = self._hold(2, 8)
        sentinel.restart_as_replica(old)
        sentinel.wait_converged(60)
        event.note = f"{new.name} promoted in {promoted:.1f} s"

    def whole_again(self, event: FaultEvent | None = None) -> None:
        """Every cut healed, both workers running and beating (a dead one started again)."""
        for host in HOSTS:
            if self.network.is_isolated(host):
                self.network.rejoin(host)
        for a in HOSTS:
            for b in HOSTS:
                if a < b and self.network.is_cut(a, b):
                    self.network.heal(a, b)
        for host in GPUS:
            worker = self.cluster.workers[host]
            if worker.proc.proc.poll() is not None:
                problem = f"{host}'s worker {worker.name} had exited (status {worker.proc.proc.returncode}); restarted"
                log.warning(problem)
                with self.ledger.lock:
                    self.ledger.problems.append(problem)
                self.cluster.start_worker(host, timeout=WORKER_START)
        for host in GPUS:
            worker = self.cluster.workers[host]
            try:
                wait_for(lambda w=worker: _beating(w), REJOIN_BOUND, f"{host}'s worker to beat", interval=0.2)
            except TimeoutError:
                after = event.name if event else "the end"
                problem = f"{host}'s worker {worker.name} not beating {REJOIN_BOUND:g} s after {after}"
                log.warning(problem)
                with self.ledger.lock:
                    self.ledger.problems.append(problem)


def _beating(worker: Worker) -> bool:
    try:
        return worker.beating()
    except Exception:  # Redis failing over, or out of reach: not yet
        return False


# -- the audit ------------------------------------------------------------------------------------------------

@dataclass
class Audit:
    by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    failed_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unacknowledged: list[str] = field(default_factory=list)


def audit(cluster: ChaosCluster, ledger: Ledger) -> Audit:
    """Per submitted item: its rows, its state, its result, its result writes (SQL), and the results route's
    lines."""
    from jobs.db import sessions
    from jobs.models import Job

    found = Audit()
    known = {job.job_id for job in ledger.jobs}
    with sessions(cluster.settings)() as session:
        writes = Counter(dict(session.execute(text(
            "SELECT item_id, count(*) FROM chaos_result_writes GROUP BY item_id")).all()))
        for job in ledger.jobs:
            counts = found.by_kind[job.kind]
            counts["jobs"] += 1
            counts["submitted"] += len(job.custom_ids)
            status = session.scalar(select(Job.status).where(Job.id == job.job_id))
            counts[f"job {status}"] += 1
            rows = session.execute(text(
                "SELECT id, custom_id, state, (output IS NOT NULL AND output::text <> 'null') AS out,"
                " embedding IS NOT NULL AS emb, error, attempts FROM job_items WHERE job_id = :job"),
                {"job": job.job_id}).all()
            by_custom: dict[str | None, list[Any]] = defaultdict(list)
            for row in rows:
                by_custom[row.custom_id].append(row)
            lines = _result_lines(cluster, job.job_id)
            for custom_id in job.custom_ids:
                mine = by_custom.pop(custom_id, [])
                where = f"{job.kind} {job.job_id} {custom_id}"
                if not mine:
                    counts["lost"] += 1
                    found.lost.append(f"{where}: no row")
                    continue
                row = mine[0]
                written = sum(writes.get(r.id, 0) for r in mine)
                listed = lines.get(custom_id, 0) if lines is not None else 1
                if len(mine) > 1 or written > 1 or listed > 1:
                    counts["duplicated"] += 1
                    found.duplicated.append(f"{where}: {len(mine)} row(s), {written} result write(s), listed {listed}x")
                if row.attempts > 1:
                    counts["re-run"] += 1
                if row.state == "succeeded" and (row.out or row.emb):
                    counts["succeeded"] += 1
                elif row.state == "failed":
                    counts["failed"] += 1
                    found.failed_errors[(job.kind, str(row.error or "")[:140])] += 1
                else:
                    counts["lost"] += 1
                    found.lost.append(f"{where}: {row.state}, result {'yes' if row.out or row.emb else 'none'}")
                if lines is not None and listed == 0 and row.state in ("succeeded", "failed"):
                    counts["lost"] += 1
                    found.lost.append(f"{where}: ended {row.state} but not in the results")
            for custom_id, extra in by_custom.items():
                found.duplicated.append(f"{job.kind} {job.job_id} {custom_id}: {len(extra)} row(s) never submitted")
                counts["duplicated"] += len(extra)
        others = session.execute(select(Job.id, Job.kind, Job.status, Job.item_count)).all()
    found.unacknowledged = [f"{row.id} ({row.kind}, {row.status}, {row.item_count} items)" for row in others
                            if row.id not in known]
    return found


def _result_lines(cluster: ChaosCluster, job_id: str) -> Counter[str] | None:
    """custom_id -> how many times the job's results route lists it (None when the route cannot be read)."""
    try:
        r = httpx.get(f"{cluster.api_url}/api/jobs/{job_id}/results", timeout=60)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return Counter(str(json.loads(line).get("custom_id")) for line in r.text.splitlines() if line.strip())


# -- the run --------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def base_settings(root: Path) -> Settings:
    models = root / "models"
    ensure_defaults(ModelStore(models))
    return Settings(home=root / "home", redis_url=None, models_dir=models, host=f"127.0.0.1:{free_port()}",  # type: ignore[call-arg]
                    database_url=f"sqlite:///{root / 'unused.db'}", heartbeat_ttl=TTL, reconcile_interval=1.0,
                    chunk_size=CHUNK, queue_timeout=QUEUE_TIMEOUT, worker_threads=1)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_drained(load: Load, ledger: Ledger, bound: float) -> float:
    started = time.monotonic()
    ids = [job.job_id for job in ledger.jobs]
    while time.monotonic() - started < bound:
        ids = load._open(ids)
        if not ids:
            break
        time.sleep(2)
    if ids:
        ledger.problems.append(f"{len(ids)} job(s) had not ended {bound:g} s after the faults stopped: {ids[:5]}")
    return time.monotonic() - started


def report(args: argparse.Namespace, ledger: Ledger, found: Audit, watch: Watch, facts: dict[str, str]) -> None:
    print(f"\n## Chaos soak: {args.minutes:g} minutes, seed {args.seed}\n")
    for key, value in facts.items():
        print(f"- {key}: {value}")

    kinds = ("generate", "embed", "batch")
    rows = []
    for kind in kinds:
        c = found.by_kind.get(kind, Counter())
        rows.append([kind, c["jobs"], c["submitted"], c["succeeded"], c["failed"], c["lost"], c["duplicated"], c["re-run"]])
    total = [sum(r[i] for r in rows) for i in range(1, 8)]
    rows.append(["**all**", *total])
    print_table("Items (audited from SQL; re-run: attempts > 1, one result still)",
                ["kind", "jobs", "submitted", "succeeded", "failed", "lost", "duplicated", "re-run"], rows)
    if found.failed_errors:
        print_table("Failed items by error", ["kind", "error", "items"],
                    [[k, e.replace("|", "/"), n] for (k, e), n in found.failed_errors.most_common()])
    if ledger.refused:
        print_table("Submissions refused (no job made)", ["kind: reason", "count"],
                    [[k.replace("|", "/"), n] for k, n in ledger.refused.most_common()])

    rows = []
    for label, pick in (("chat", lambda c: not c.stream), ("chat, streamed", lambda c: c.stream),
                        ("all", lambda c: True)):
        chats = [c for c in ledger.chats if pick(c)]
        ok = [c.seconds * 1000 for c in chats if c.outcome == "ok"]
        every = [c.seconds * 1000 for c in chats]
        rows.append([label, len(chats), len(chats) - len(ok), f"{percentile(ok, 50):.0f}", f"{percentile(ok, 95):.0f}",
                     f"{max(ok, default=float('nan')):.0f}", f"{percentile(every, 95):.0f}"])
    print_table("Interactive requests (ms; p50/p95/max of those that succeeded, and p95 of all)",
                ["requests", "sent", "failed", "p50", "p95", "max", "p95, failures included"], rows)
    failures = Counter((c.outcome, c.fault) for c in ledger.chats if c.outcome != "ok")
    if failures:
        print_table("Interactive failures by reason and the fault around them", ["reason", "fault", "count"],
                    [[o.replace("|", "/"), f, n] for (o, f), n in failures.most_common()])

    by_fault: dict[str, list[FaultEvent]] = defaultdict(list)
    for event in ledger.faults:
        by_fault[event.name].append(event)
    print_table("Faults", ["fault", "times", "hosts", "held s (mean)", "last note"],
                [[name, len(events), ", ".join(f"{h} {n}" for h, n in Counter(e.host for e in events).items()),
                  sum(e.hold for e in events) / len(events), events[-1].note.replace("|", "/")]
                 for name, events in sorted(by_fault.items())])
    print_table("Processes: RSS and PSS (MiB) and open descriptors, at the start (after warm-up) and the end",
                ["process", "pid", "RSS start", "RSS end", "RSS peak", "PSS start", "PSS end", "fds start", "fds end",
                 "fds peak", "procs"],
                watch.rows())
    for title, entries in (("Lost", found.lost), ("Duplicated", found.duplicated),
                           ("Jobs in SQL the bench was not told of (a submission answered with an error)", found.unacknowledged),
                           ("Problems", ledger.problems)):
        if entries:
            print(f"\n{title} ({len(entries)}):")
            for entry in entries[:20]:
                print(f"- {entry}")


def tracebacks(root: Path) -> str:
    found = []
    for path in sorted((root / "logs").glob("*/*.log")):
        n = path.read_text(errors="replace").count("Traceback")
        if n:
            found.append(f"{path.parent.name}/{path.name} {n}")
    return ", ".join(found) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the faulted phase")
    parser.add_argument("--seed", type=int, default=None, help="the faults' and the load's seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"the faults to draw from (default: {','.join(FAULTS)})")
    args = parser.parse_args(argv)
    args.seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    kinds = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    if not kinds or set(kinds) - set(FAULTS):
        parser.error(f"--faults: choose from {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "corral.harness.sentinel", "corral.harness.netns"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    ok, why = can_make_namespaces()
    if ok and missing() is not None:
        ok, why = False, str(missing())
    if not ok:
        print(f"bench.chaos needs network namespaces (run it as root), Redis and PostgreSQL: {why}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="corral-chaos-"))
    ledger = Ledger()
    facts = {"command": " ".join(["env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python -m bench.chaos",
                                  *(argv if argv is not None else sys.argv[1:])]),
             "seed": str(args.seed), "load average at start (1/5/15 min)": loadavg(), "cores": str(os.cpu_count())}
    log.info("chaos soak: %g min, seed %d, logs in %s, load %s", args.minutes, args.seed, root,
             facts["load average at start (1/5/15 min)"])
    failed = True
    stop = threading.Event()
    try:
        with sigterm_as_interrupt(), Network(HOSTS) as network, ChaosCluster(network, base_settings(root), root) as cluster:
            started = time.monotonic()
            cluster.start_all()
            log.info("cluster on %s up in %.1f s (Redis %s)", network.subnet, time.monotonic() - started, cluster.redis_url)
            watch = Watch(cluster)
            load = Load(cluster, ledger, args.seed)
            load.start()
            # warm-up: both models loaded and a job of each kind ended, before the first sample and fault
            try:
                wait_for(lambda: {j.kind for j in ledger.jobs if not load._open([j.job_id])} >= {"generate", "embed", "batch"},
                         WARMUP_BOUND, "a job of each kind to end", interval=1.0)
            except TimeoutError as exc:
                ledger.problems.append(f"warm-up: {exc}")
            watch.sample("start")
            sampler_stop = threading.Event()

            def sampler() -> None:
                while not sampler_stop.wait(20):
                    with contextlib.suppress(Exception):
                        watch.sample()

            threading.Thread(target=sampler, daemon=True, name="sampler").start()
            faults = Faults(cluster, ledger, random.Random(args.seed), kinds)
            soak_started = time.monotonic()
            try:
                faults.run(soak_started + args.minutes * 60, stop)
            finally:
                faults.whole_again()
            soaked = time.monotonic() - soak_started
            log.info("faults stopped after %.1f min; stopping the load", soaked / 60)
            load.join(CHAT_TIMEOUT + 10)
            drained = wait_drained(load, ledger, DRAIN_BOUND)
            log.info("every job ended %.1f s after the load stopped; auditing", drained)
            sampler_stop.set()
            watch.sample("end")
            found = audit(cluster, ledger)
            facts.update({
                "load average at end (1/5/15 min)": loadavg(), "faulted phase": f"{soaked / 60:.1f} min",
                "drain after the faults": f"{drained:.0f} s", "cluster": f"{network.subnet}, Redis {cluster.redis_url}",
                "Tracebacks in the logs": tracebacks(root),
            })
            report(args, ledger, found, watch, facts)
            lost = sum(c["lost"] for c in found.by_kind.values())
            duplicated = sum(c["duplicated"] for c in found.by_kind.values())
            failed = bool(lost or duplicated)
            print(f"\n**{'FAIL' if failed else 'PASS'}**: {lost} lost, {duplicated} duplicated")
        leftovers = network.leftovers()
        if leftovers:
            print(f"left behind: {leftovers}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: everything started is being removed", file=sys.stderr)
        stop.set()
        return 130
    finally:
        stop.set()
        if args.keep or failed:
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
