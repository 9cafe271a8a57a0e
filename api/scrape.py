"""``GET /metrics`` in Prometheus' text format: the counters of :mod:`api.metrics`, and gauges read from the
sources of truth at scrape time (:class:`StateCollector`), so every API replica reports the same numbers:
interactive requests waiting per model (Redis), batch chunks queued/running per model and job items by state
(SQL), live workers and the models they hold (heartbeat keys).

With keys required, what a scrape shows depends on its key: the per-key series (``corral_key_tokens``, which
name every key) go to an admin key only, and a key with a model allow-list sees the series of its models only
(:class:`Visible`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.metrics import UNKNOWN, Metrics, model_label
from api.openapi import documented
from api.services import services
from jobs.db import sessions
from jobs.keys import Principal
from jobs.models import Chunk, ChunkState
from jobs.readstates import counts_by_state

bp = Blueprint("metrics", __name__)
ADMIN_ONLY = frozenset({"corral_key_tokens"})  # families whose labels name keys


def init_app(app: Flask) -> None:
    """The gauges join the app's registry (:func:`api.metrics.init_app` made it), and ``GET /metrics`` its routes."""
    metrics: Metrics = app.extensions["corral_metrics"]
    metrics.registry.register(StateCollector(app))
    app.register_blueprint(bp)


class StateCollector(Collector):
    """Gauges computed at scrape time from Redis and SQL."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        shared = services(self.app)
        records = {r.model_digest: r.name.display for r in shared.store.list()}
        waiting = GaugeMetricFamily("corral_queue_depth", "Requests or chunks waiting, per model and class",
                                    labels=["model", "class", "state"])
        for digest, name in records.items():
            waiting.add_metric([name, "interactive", "waiting"], shared.gateway.waiting(digest))
        with sessions(shared.settings)() as session:
            chunks = session.execute(
                select(Chunk.model_digest, Chunk.state, func.count()).where(Chunk.state != ChunkState.DONE)
                .group_by(Chunk.model_digest, Chunk.state)
            ).all()
            counts = counts_by_state(session)  # as read: a stopped job's pending items are cancelled
        batch: dict[tuple[str, str], int] = {}
        for digest, state, n in chunks:  # chunks of a model deleted since are its jobs' to finish: "unknown"
            labels = (records.get(digest, UNKNOWN), str(state))
            batch[labels] = batch.get(labels, 0) + int(n)
        for (name, state), n in batch.items():
            waiting.add_metric([name, "batch", state], n)
        yield waiting
        by_state = GaugeMetricFamily("corral_job_items", "Batch-job items by state", labels=["state"])
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        workers = shared.gateway.workers()
        yield GaugeMetricFamily("corral_workers", "Live workers (heartbeat present)", value=len(workers))
        loaded = GaugeMetricFamily("corral_loaded_models", "Models loaded in workers", labels=["model"])
        names: dict[str, int] = {}
        for worker in workers:
            for entry in worker.get("loaded", []):
                name = model_label(str(entry.get("name", "")), shared.store)  # the name the loading request sent
                names[name] = names.get(name, 0) + 1
        for name, n in names.items():
            loaded.add_metric([name], n)
        yield loaded


@bp.get("/metrics")
@documented(summary="Prometheus metrics.", media="text/plain")
def scrape() -> Response:
    metrics: Metrics = current_app.extensions["corral_metrics"]
    who: Principal | None = g.get("principal")
    if who is None or who.admin:  # keys off, or an admin key (a Prometheus scraper's): everything
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)
    shown = CollectorRegistry(auto_describe=False)
    shown.register(Visible(metrics.registry, who))
    return Response(generate_latest(shown), mimetype=CONTENT_TYPE_LATEST)


class Visible(Collector):
    """The metrics as a non-admin key may see them: no per-key series (they name every key and its traffic;
    the key's own usage is at /api/usage), and no series labelled with a model outside its allow-list."""

    def __init__(self, registry: CollectorRegistry, who: Principal) -> None:
        self.registry = registry
        self.who = who

    def collect(self) -> Iterator[Metric]:
        governor = services().governor
        for family in self.registry.collect():
            if family.name in ADMIN_ONLY:
                continue
            kept = [s for s in family.samples if "model" not in s.labels or governor.allowed(self.who, s.labels["model"])]
            if len(kept) < len(family.samples):
                family = _with_samples(family, kept)
            yield family


def _with_samples(family: Metric, samples: list[Any]) -> Metric:
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    copy.samples = samples
    return copy
