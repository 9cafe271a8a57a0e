"""Start one Celery worker process: pin it to a GPU (or the CPU), pick its queues, serve."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from celery.signals import task_received, worker_ready, worker_shutdown, worker_shutting_down

from corral.cpu_kernels import side_libraries
from corral.errors import CorralError
from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.protocol import BUILD_QUEUE, model_queue
from corral.settings import Settings


def worker_name(gpu: int | None) -> str:
    """A node name unique per process: ``gpu0@host`` or ``cpu-<pid>@host``."""
    host = socket.gethostname()
    return f"gpu{gpu}@{host}" if gpu is not None else f"cpu-{os.getpid()}@{host}"


def queues_for(store: ModelStore, models: list[str] | None) -> tuple[list[str], list[str]]:
    """(queues, model names): the interactive lanes' lists (workers/interactive.py), then Celery's batch queues."""
    records = [store.get(m) for m in models] if models else store.list()
    digests: list[str] = []
    for record in records:
        if record.model_digest not in digests:
            digests.append(record.model_digest)
    queues = [model_queue(d, "interactive") for d in digests] + [model_queue(d, "batch") for d in digests]
    return queues, [r.name.display for r in records]


STORE_SCAN_SECONDS = 3.0


def choose_libraries(store: ModelStore, models: list[str] | None) -> Path | None:
    """Point llama-cpp-python at the best level's libraries (corral/cpu_kernels.py ``side_libraries``) when this
    worker serves only embedding and rerank models (``--models``), which gain from AVX-512 where generation
    loses; None (the installed generation-level package) otherwise.  Before llama_cpp is first imported."""
    if not models or "llama_cpp" in sys.modules:
        return None
    if any("completion" in store.get(m).capabilities for m in models):
        return None
    side = side_libraries()
    if side is not None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(side)
        os.environ["MTMD_CPP_LIB"] = str(side)
    return side


def check_kernels() -> dict[str, Any]:
    """The CPU kernel level compiled into the llama.cpp this process loads, refused where this CPU lacks it
    (a venv or image built on a newer CPU): a clear error now instead of SIGILL on the first request."""
    import llama_cpp

    from corral.cpu_kernels import KernelMismatch, check_loaded

    try:
        return check_loaded(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
    except KernelMismatch as exc:
        raise CorralError(str(exc)) from exc


def _serve_new_models(app: Any, runtime: Any, store: ModelStore) -> None:
    """Start consuming the queues of models pulled since start-up (a worker without ``--models`` serves all).

    New queues are appended after the existing ones, so a new model's interactive queue is polled after the
    older models' batch queues within one poll; restarting the worker restores the strict order.
    """
    queues, names = queues_for(store, None)
    for queue in queues:
        if queue not in runtime.queues:
            if not queue.endswith(".lane"):  # the interactive lane reads runtime.queues at every pop
                app.control.add_consumer(queue, destination=[runtime.name], reply=False)
            runtime.queues.append(queue)
            logging.getLogger("corral.worker").info("now also consuming %s", queue)
    runtime.models = names


SYNC_SECONDS = STORE_SCAN_SECONDS  # one small request to the API (GET /api/tags) per round


def _sync_from(store: ModelStore, url: str, settings: Settings, runtime: Any) -> None:
    """Copy the models the API has created or pulled since start-up (a ``--pull-from`` worker without
    ``--models``).  Its own thread: a large copy must not hold up the heartbeat."""
    from corral.modelstore.remote import pull_from_server

    log = logging.getLogger("corral.worker")
    while not runtime.stopping():
        time.sleep(SYNC_SECONDS)
        try:
            copied = pull_from_server(store, url, None, api_key=settings.api_key)
            if copied:
                log.info("copied from %s: %s", url, ", ".join(copied))
        except Exception as exc:  # the API restarting, say: try again at the next round
            log.warning("cannot sync models from %s: %s", url, exc)


def run_worker(
    settings: Settings, *, gpu: int | None, models: list[str] | None, loglevel: str = "INFO",
    pull_from: str | None = None,
) -> None:
    """Run a worker in the foreground until it is told to stop."""
    if gpu is not None:
        # Must happen before llama_cpp (and so CUDA) is first imported in this process.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = ModelStore(settings.models_path)
    if pull_from:
        from corral.modelstore.remote import pull_from_server

        pulled = pull_from_server(store, pull_from, models, api_key=settings.api_key)
        logging.getLogger("corral.worker").info("models from %s: %s", pull_from, ", ".join(pulled))
    else:
        ensure_defaults(store)
    queues, names = queues_for(store, models)
    if not queues:
        raise CorralError(f"no models to serve in {store.root}; pull one first")
    side = choose_libraries(store, models)
    kernels = check_kernels()
    logging.getLogger("corral.worker").info("llama.cpp CPU kernels: %s (%s)%s", kernels["variant"],
                                            " ".join(kernels["features"]), f" from {side}" if side else "")
    if not pull_from:  # this worker shares the API's store: it may check and quantize models for /api/create
        queues.insert(sum(1 for q in queues if q.endswith(".lane")), BUILD_QUEUE)
    from corral.broker import make_celery

    app = make_celery(settings)
    # Reconnect to a lost broker within seconds of its return, not kombu's up to 30 s (workers/consumer.py).
    app.conf.worker_consumer = "workers.consumer:Consumer"
    from workers import queue_gate
    from workers.runtime import CHUNKS_PER_WORKER

    queue_gate.install(app, CHUNKS_PER_WORKER)
    import workers.batch
    import workers.tasks
    from jobs.reconcile import Reconciler
    from jobs.webhooks import Sender
    from workers.interactive import InteractiveLane, lane_threads
    from workers.runtime import WorkerRuntime, task_threads

    name = worker_name(gpu)
    lanes: list[InteractiveLane] = []

    @worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        # Celery warns at every connection loss that its next major version cancels late-acked tasks then; corral
        # says False itself (corral/broker.py: a running chunk writes to SQL and goes on), so the warning is noise.
        # Here, not earlier: Celery's logging setup puts its own "always" filter for these warnings first.
        warnings.filterwarnings("ignore", message=r"\s*In Celery 5.1 we introduced an optional breaking change")
        runtime = WorkerRuntime(settings, name, gpu=gpu, queues=queues, models=names, kernels=kernels)
        runtime.requests.pull_from = pull_from
        app.corral_runtime = runtime
        reconciler = Reconciler(settings, app, runtime.redis, name)
        runtime.periodic.append((settings.reconcile_interval, reconciler.sweep))
        # Webhooks go out from a thread of their own: a slow receiver must not hold up the heartbeat.
        Sender(settings, stopping=runtime.stopping).start()
        if not models:
            runtime.periodic.append((STORE_SCAN_SECONDS, lambda: _serve_new_models(app, runtime, store)))
            if pull_from:  # and the store scan finds what the API has created or pulled since
                threading.Thread(target=_sync_from, args=(store, pull_from, settings, runtime), daemon=True,
                                 name="corral-pull-from").start()
        runtime.start()
        lane = InteractiveLane(runtime, lane_threads(settings.num_parallel))
        lane.start()
        lanes.append(lane)
        try:
            reconciler.sweep(startup=True)
        except Exception:  # a database hiccup must not keep the worker from serving chat
            logging.getLogger("corral.worker").exception("start-up reconcile failed")
        logging.getLogger("corral.worker").info("worker %s serving %s", name, ", ".join(names))

    @task_received.connect(weak=False)
    def _received(request: Any, **_: Any) -> None:
        runtime = getattr(app, "corral_runtime", None)
        if runtime is not None:
            workers.batch.mark_received(runtime, request)

    @worker_shutting_down.connect(weak=False)
    def _shutting_down(**_: Any) -> None:
        for lane in lanes:  # take no new interactive requests; those under way go on
            lane.stop()

    @worker_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        for lane in lanes:  # Celery has waited for its tasks; now the interactive requests
            lane.join()
        runtime = getattr(app, "corral_runtime", None)
        if runtime is not None:
            runtime.stop()

    app.worker_main(
        [
            "worker",
            # Threads: a chunk's requests meet interactive ones in the model's decode loop, which is the only
            # owner of the llama.cpp context; llama.cpp releases the GIL while it computes.
            "--pool=threads",
            f"--concurrency={task_threads(settings.num_parallel)}",
            f"--hostname={name}",
            # Celery consumes the batch and build queues; the interactive lane the rest (workers/interactive.py)
            f"--queues={','.join(q for q in queues if not q.endswith('.lane'))}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--loglevel={loglevel}",
        ]
    )
