"""The chaos soak's load (bench/chaos.py): client threads sending chats, generate jobs, embed jobs and OpenAI batches
to the API on ``api-a`` for as long as the soak runs.

Why modest: the soak runs on 2 cores beside other work, and what it judges is whether faults lose or duplicate
work, not throughput; each job kind keeps at most one or two jobs open, so the backlog stays bounded and every job
can be waited for at the end.  Chats (half of them streamed) are timed, and each one's outcome goes into the
ledger with the fault around it; a job submission the API refuses (a 503 while PostgreSQL restarts, say) is
counted by reason and fault, and no job is expected of it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import select

from bench.chaos_cluster import QUEUE_TIMEOUT, ChaosCluster
from bench.chaos_ledger import Interactive, Ledger, Submitted

log = logging.getLogger("bench.chaos")

CHAT_MODEL = "smollm2"
EMBED_MODEL = "all-minilm"
NUM_PREDICT = 6
CHAT_TIMEOUT = QUEUE_TIMEOUT + 30  # above it: the API's own answer is what is counted


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
            self.ledger.problem(f"load thread {name} died: {exc!r}")

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
                    return f"HTTP {r.status_code}: {error_text(r.text)}"
                lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}"
        except json.JSONDecodeError:
            return "a line that is not JSON"
        for line in lines:
            if "error" in line:
                return f"{'stream ' if stream else ''}error: {error_text(json.dumps(line))}"
        if not lines or not lines[-1].get("done"):
            return "ended without done"
        return "ok"

    # jobs
    def open_jobs(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` whose job has not ended (SQL: the truth)."""
        if not ids:
            return []
        from jobs.models import Job
        from jobs.states import JobStatus

        try:
            with self.sessions() as session:
                ended = set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.status.in_(JobStatus.TERMINAL))))
        except Exception:  # the database restarting, or its host cut from the bench: count them open
            return ids
        return [i for i in ids if i not in ended]

    def _jobs_loop(self, rng: random.Random, kind: str, at_once: int,
                   submit: Callable[[httpx.Client, random.Random], Submitted | None]) -> None:
        mine: list[str] = []
        with self._client() as client:
            while not self.stop.is_set():
                mine = self.open_jobs(mine)
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
        """Count a submission that made no job, by reason and by the fault active as it was refused."""
        now = time.monotonic()
        fault = self.ledger.fault_around(now, now)
        log.info("%s submission refused: %s [%s]", kind, why, fault)
        with self.ledger.lock:
            self.ledger.refused[(f"{kind}: {why}", fault)] += 1

    def _post_job(self, client: httpx.Client, kind: str, label: str, body: dict[str, Any]) -> Submitted | None:
        r = client.post("/api/jobs", json=body)
        if r.status_code != 202:
            self._refuse(label, f"HTTP {r.status_code}: {error_text(r.text)}")
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
                self._refuse("batch", f"upload HTTP {r.status_code}: {error_text(r.text)}")
                return None
            r = client.post("/v1/batches", json={"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
                                                 "completion_window": "24h"})
            if r.status_code != 200:
                self._refuse("batch", f"HTTP {r.status_code}: {error_text(r.text)}")
                return None
            batch = r.json()
            if batch.get("status") == "failed":
                self._refuse("batch", f"failed at creation: {error_text(json.dumps(batch.get('errors')))}")
                return None
            return Submitted("batch", str(batch["id"]), ids, time.monotonic())

        self._jobs_loop(rng, "batch", 1, submit)


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud garden").split()


def error_text(body: str) -> str:
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
