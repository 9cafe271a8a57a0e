"""``GET /metrics`` in Prometheus' text format (prometheus-client).

Counted as requests happen: requests by route and status, generated tokens (``rate()`` of it is tokens/s),
time to first token.  Read from the sources of truth at scrape time, so every API replica reports the same
numbers: interactive requests waiting per model (Redis), batch chunks queued/running per model and job items by
state (SQL), live workers (heartbeat keys).

Every label comes from a bounded set, so no client can grow the series without end: a ``model`` label is the
model's canonical name (``SmolLM2 `` counts as ``smollm2:latest``, :func:`model_label`) or ``unknown``, a
``method`` label one of HTTP's methods or ``other``.  With keys required, what a scrape shows depends on its
key: the per-key series (``corral_key_tokens``, which name every key) go to an admin key only, and a key with a
model allow-list sees the series of its models only (:class:`Visible`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, has_app_context, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.openapi import documented
from api.services import services
from corral.errors import BadRequest
from corral.store import ModelName, ModelStore
from jobs.db import sessions
from jobs.keys import Principal
from jobs.models import Chunk, ChunkState, Item, ItemState

bp = Blueprint("metrics", __name__)
UNKNOWN = "unknown"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ADMIN_ONLY = frozenset({"corral_key_tokens"})  # families whose labels name keys


def model_label(name: str, store: ModelStore) -> str:
    """The ``model`` label of ``name``: the canonical name of the model it resolves to, as the routes resolve it
    (case, surrounding blanks and the default host, namespace and tag do not matter), or ``unknown``.  Every
    series labelled by model goes through here, so a client that spells one model many ways makes one series,
    and names that resolve to no model make none of their own."""
    try:
        parsed = ModelName.parse(name)
    except BadRequest:
        return UNKNOWN
    return parsed.display if parsed.manifest_path(store.root).is_file() else UNKNOWN


class Metrics:
    """One registry per app (so tests can build many apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corral_http_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "corral_generated_tokens", "Tokens generated for interactive requests", ["model"], registry=self.registry
        )
        self.key_tokens = Counter(
            "corral_key_tokens", "Tokens of sync traffic per API key", ["key", "kind"], registry=self.registry
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds", "Time from request to first generated text", ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry,
        )


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
            items = session.execute(select(Item.state, func.count()).group_by(Item.state)).all()
        batch: dict[tuple[str, str], int] = {}
        for digest, state, n in chunks:  # chunks of a model deleted since are its jobs' to finish: "unknown"
            labels = (records.get(digest, UNKNOWN), str(state))
            batch[labels] = batch.get(labels, 0) + int(n)
        for (name, state), n in batch.items():
            waiting.add_metric([name, "batch", state], n)
        yield waiting
        by_state = GaugeMetricFamily("corral_job_items", "Batch-job items by state", labels=["state"])
        counts = dict.fromkeys(ItemState.ALL, 0)
        counts.update({state: int(n) for state, n in items})
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


def init_app(app: Flask) -> Metrics:
    metrics = Metrics()
    metrics.registry.register(StateCollector(app))
    app.extensions["corral_metrics"] = metrics

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in METHODS else "other"
        metrics.requests.labels(route, method, str(resp.status_code)).inc()
        return resp

    return metrics


def observe_first_token(model: str, seconds: float) -> None:
    """``model``: the name as the request sent it (labelled by :func:`model_label`)."""
    metrics: Any = current_app.extensions.get("corral_metrics")
    if metrics is not None:
        metrics.ttft.labels(model_label(model, services().store)).observe(seconds)


def observe_tokens(model: str, count: int) -> None:
    """``model``: the name as the request sent it (labelled by :func:`model_label`)."""
    metrics: Any = current_app.extensions.get("corral_metrics")
    if metrics is not None and count:
        metrics.tokens.labels(model_label(model, services().store)).inc(count)


def observe_key_tokens(key: str, prompt: int, generated: int) -> None:
    if not has_app_context():
        return
    metrics: Any = current_app.extensions.get("corral_metrics")
    if metrics is not None:
        metrics.key_tokens.labels(key, "prompt").inc(prompt)
        metrics.key_tokens.labels(key, "generated").inc(generated)


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
