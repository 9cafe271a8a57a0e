"""A test or bench stack: a worker and an API server, each a child process (``python -m cli``, as in
production) with its own log, against one set of settings, on a freshly migrated database."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import Engine

from corral.redis_connection import redis_client
from corral.settings import Settings
from harness.processes import die_with_parent

# Where the children start: the checkout's root, so `python -m cli` finds the packages beside it.
ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same settings (none of this one's own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env.update(settings.environment(), PYTHONUNBUFFERED="1")
    return env


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    """A child process with its log file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.stopped(timeout)

    def stopped(self, timeout: float = 30) -> int:
        """Wait for the process to end (killed after ``timeout``); its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Stack:
    """A worker and/or API server running against one set of settings.

    ``prefix``: words put before each child's command line, such as ``ip netns exec gpu-1`` to start it on one
    host of a test network (:mod:`harness.netns`); the command itself stays the one a deployment runs."""

    settings: Settings
    logs: Path
    procs: list[Proc] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)

    def _spawn(self, name: str, *args: str) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}-{len(self.procs)}.log"
        with open(log, "wb") as fh:  # the child writes to its own copy of the descriptor
            proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "cli", *args],
                env=settings_env(self.settings),
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        p = Proc(proc, log)
        self.procs.append(p)
        return p

    @functools.cached_property
    def redis(self) -> redis.Redis:
        """One client for the stack's life (a client per look left its connections to the garbage collector)."""
        return redis_client(self.settings.redis)

    def start_worker(self, *args: str, timeout: float = 60) -> Proc:
        return self._spawn_worker(*args)(timeout)

    def _spawn_worker(self, *args: str) -> Callable[[float], Proc]:
        """Start a worker; the returned call waits (up to its timeout) for the worker's first heartbeat."""
        before = {k for k in self.redis.scan_iter(match="corral:worker:*")}
        proc = self._spawn("worker", "worker", *args)

        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{proc.output()}")
            return bool({k for k in self.redis.scan_iter(match="corral:worker:*")} - before)

        def wait(timeout: float) -> Proc:
            wait_for(ready, timeout, "the worker's heartbeat", interval=0.05)
            return proc

        return wait

    def worker_names(self) -> list[str]:
        return [json.loads(v)["name"] for v in self.redis.mget(list(self.redis.scan_iter(match="corral:worker:*"))) if v]

    def start_api(self, timeout: float = 60) -> Proc:
        return self._spawn_api()(timeout)

    def _spawn_api(self) -> Callable[[float], Proc]:
        """Start an API server; the returned call waits (up to its timeout) until it answers."""
        proc = self._spawn("api", "serve")

        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"API exited:\n{proc.output()}")
            try:
                return httpx.get(self.base_url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        def wait(timeout: float) -> Proc:
            wait_for(ready, timeout, "the API", interval=0.05)
            return proc

        return wait

    def start_both(self, *worker_args: str, timeout: float = 60) -> tuple[Proc, Proc]:
        """A worker (``corral worker`` with ``worker_args``) and an API server started together (each takes
        seconds to import and start, which they spend side by side); (worker, API) once the worker has sent its
        heartbeat and the API answers."""
        worker, api = self._spawn_worker(*worker_args), self._spawn_api()
        return worker(timeout), api(timeout)

    @property
    def base_url(self) -> str:
        host, port = self.settings.bind
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop every process, all signalled at once: each takes a second or so to shut down gracefully."""
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            proc.stopped()
        self.procs.clear()
        if "redis" in self.__dict__:
            self.__dict__.pop("redis").close()

    @contextmanager
    def running(self, *worker_args: str) -> Iterator[Stack]:
        """A worker (with ``worker_args``) and an API server, stopped on the way out."""
        try:
            self.start_both(*worker_args)
            yield self
        finally:
            self.stop()


# -- its database ----------------------------------------------------------------------------------------------

def fresh_database(settings: Settings) -> None:
    """Drop whatever an earlier run left in a shared database (a SQLite file is taken as new), then apply the
    migrations."""
    from jobs.db import engine_for, upgrade

    if not settings.database.startswith("sqlite"):
        drop_everything(engine_for(settings.database))
    upgrade(settings)


def drop_everything(engine: Engine) -> None:
    """Empty a database of corral's tables: pgvector's index of job_items (if any), the models', Alembic's."""
    from sqlalchemy import text

    from jobs.collection_search import VECTOR_TABLE as CHUNK_VECTORS
    from jobs.models import Base
    from jobs.search import VECTOR_TABLE

    # CASCADE: the database may hold an older schema than the models (foreign keys that migration 0010 dropped),
    # so the models' drop order is not enough
    cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as conn:
        for table in [VECTOR_TABLE, CHUNK_VECTORS, *(t.name for t in reversed(Base.metadata.sorted_tables)), "alembic_version"]:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}{cascade}"))
