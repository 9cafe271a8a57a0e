"""Prometheus metrics counted as requests happen (prometheus-client): requests by route and status, generated
tokens (``rate()`` of it is tokens/s), time to first token, tokens per API key.  The services call the
``observe_*`` functions; ``GET /metrics`` and the gauges it reads at scrape time are :mod:`api.scrape`.

Every label comes from a bounded set, so no client can grow the series without end: a ``model`` label is the
model's canonical name (``SmolLM2 `` counts as ``smollm2:latest``, :func:`model_label`) or ``unknown``, a
``method`` label one of HTTP's methods or ``other``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, current_app, has_app_context, request
from prometheus_client import CollectorRegistry, Counter, Histogram

from api.services import services
from corral.errors import BadRequest
from corral.modelstore.store import ModelName, ModelStore

UNKNOWN = "unknown"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


def init_app(app: Flask) -> Metrics:
    metrics = Metrics()
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
