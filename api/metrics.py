"""``GET /metrics`` in Prometheus' text format (prometheus-client).

Counted as requests happen: requests by route and status, generated tokens (``rate()`` of it is tokens/s),
time to first token.  Read from the sources of truth at scrape time, so every API replica reports the same
numbers: interactive requests waiting per model (Redis), batch chunks queued/running per model and job items by
state (SQL), live workers (heartbeat keys).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, has_app_context, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.openapi import documented
from api.services import services
from jobs.db import sessions
from jobs.models import Chunk, ChunkState, Item, ItemState

bp = Blueprint("metrics", __name__)


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
        for digest, state, n in chunks:
            waiting.add_metric([records.get(digest, digest[:12]), "batch", state], int(n))
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
                names[entry["name"]] = names.get(entry["name"], 0) + 1
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
        metrics.requests.labels(route, request.method, str(resp.status_code)).inc()
        return resp

    return metrics


def observe_first_token(model: str, seconds: float) -> None:
    metrics: Any = current_app.extensions.get("corral_metrics")
    if metrics is not None:
        metrics.ttft.labels(model).observe(seconds)


def observe_tokens(model: str, count: int) -> None:
    metrics: Any = current_app.extensions.get("corral_metrics")
    if metrics is not None and count:
        metrics.tokens.labels(model).inc(count)


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
    return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)
