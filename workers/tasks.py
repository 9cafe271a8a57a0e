"""Celery tasks.  Each is a thin shell: decode the payload, hand it to the process's :class:`WorkerRuntime`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from corral.broker import UNREACHABLE
from corral.errors import CorralError, GenerationFailed, WorkerUnavailable
from corral.protocol import BUILD_TASK, INTERACTIVE_TASK, BuildRequest, InferenceRequest, StreamWriter, waiting_key
from workers.building import run_build
from workers.engine import default_threads
from workers.items import count_tokens
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def runtime_of(task: Task) -> WorkerRuntime:
    runtime = getattr(task.app, "corral_runtime", None)
    if runtime is None:
        raise RuntimeError("worker runtime not started (tasks only run inside `corral worker`)")
    return runtime  # type: ignore[no-any-return]


# What a reader gets for a request the worker skipped at its start (cancelled, or its reader's lease gone):
# nobody reads it as a rule, but a reader whose lease lapsed while it was alive must not wait for ever.
ABANDONED = WorkerUnavailable("the request was abandoned before it ran: its client went away or stopped "
                              "renewing its reader's lease")


@shared_task(name=INTERACTIVE_TASK, bind=True, acks_late=False, ignore_result=True)
def interactive(self: Task, payload: dict[str, Any]) -> None:
    """Run one chat/generate/embed/load request and stream its reply to Redis."""
    runtime = runtime_of(self)
    req = InferenceRequest.from_payload(payload)
    writer = StreamWriter(runtime.redis, req.request_id, runtime.settings.stream_ttl, leased=req.leased)
    if not writer.claim(runtime.name):  # a copy the API re-sent (corral/protocol.py StreamReader.resend)
        log.info("request %s is running elsewhere already; skipping this copy", req.request_id)
        return
    # one round trip: the event, leaving the model's waiting set, and "was it cancelled?"
    if writer.emit("start", {"worker": runtime.name}, leave=waiting_key(req.model_digest)):
        log.info("request %s was cancelled while queued; skipping", req.request_id)
        writer.fail(ABANDONED)  # a terminal event, should its reader be alive after all (a lapsed lease)
        return
    try:
        try:
            runtime.requests.execute(req, writer)
        except CorralError as exc:
            writer.fail(exc)
        except UNREACHABLE:
            raise
        except Exception as exc:
            log.exception("request %s failed", req.request_id)
            writer.fail(GenerationFailed(f"{type(exc).__name__}: {exc}"))
    except UNREACHABLE as exc:  # Redis went away mid-reply: its reader already tells its client of the outage
        log.warning("request %s stopped: Redis is out of reach (%s: %s)", req.request_id, type(exc).__name__, exc)


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
