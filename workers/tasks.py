"""Celery tasks.  Each is a thin shell: decode the payload, hand it to the process's :class:`WorkerRuntime`.

Interactive requests are not Celery tasks: the worker's interactive lane runs them (workers/interactive.py).
Batch chunks are (workers/batch.py), and so are model builds, here."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from corral.errors import CorralError, GenerationFailed
from corral.protocol import BUILD_TASK, BuildRequest, StreamWriter
from workers.building import run_build
from workers.engine import default_threads
from workers.interactive import ABANDONED
from workers.items import count_tokens
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def runtime_of(task: Task) -> WorkerRuntime:
    runtime = getattr(task.app, "corral_runtime", None)
    if runtime is None:
        raise RuntimeError("worker runtime not started (tasks only run inside `corral worker`)")
    return runtime  # type: ignore[no-any-return]


@shared_task(name=BUILD_TASK, bind=True, acks_late=False, ignore_result=True)
def build(self: Task, payload: dict[str, Any]) -> None:
    """Check or quantize a GGUF for /api/create (or count a dry run's prompt tokens), streaming progress and the
    outcome to Redis."""
    runtime = runtime_of(self)
    req = BuildRequest.model_validate(payload)
    writer = StreamWriter(runtime.redis, req.request_id, runtime.settings.stream_ttl, leased=req.leased)
    if writer.emit("start", {"worker": runtime.name}):
        writer.fail(ABANDONED)
        return
    try:
        if req.op == "count":  # a dry run's prompt tokens: the model's own tokenizer and template, in this process
            writer.emit("result", {"counts": count_tokens(runtime, req)})
            return
        run_build(runtime.store, req, writer, threads=default_threads(runtime.settings.worker_threads))
    except CorralError as exc:
        writer.fail(exc)
    except Exception as exc:
        log.exception("build %s failed", req.request_id)
        writer.fail(GenerationFailed(f"{type(exc).__name__}: {exc}"))
