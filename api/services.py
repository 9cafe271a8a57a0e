"""The services one app's views share, and the one way a view reaches them (:func:`services`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app

from api.models_admin import ModelAdmin
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from jobs.batches import BatchService
from jobs.collections import CollectionService
from jobs.files import FileStore
from jobs.keys import Principal
from jobs.service import JobService

if TYPE_CHECKING:  # the gateway and inference modules import this one's callers
    from api.gateway import Gateway
    from api.governance import Governor
    from api.inference import Inference


@dataclass
class Services:
    """Built once per app by ``create_app`` and kept in ``app.extensions["corral"]``."""

    settings: Settings
    store: ModelStore
    gateway: Gateway
    inference: Inference
    jobs: JobService
    files: FileStore
    batches: BatchService
    governor: Governor
    models: ModelAdmin = field(init=False)  # pull, show and create, over the inference service's store and gateway
    collections: CollectionService = field(init=False)  # vector stores, indexed by jobs of this job service

    def __post_init__(self) -> None:
        self.models = ModelAdmin(self.settings, self.inference)
        self.collections = CollectionService(self.settings, self.store, self.jobs)

    def queue(self, who: Principal | None, workers: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch queue per model and ``workers`` (heartbeat states), with only the models ``who`` may use: what
        /api/queue and the console's queue page show (a limited key learns nothing of the other models)."""
        waiting = {r.model_digest: self.gateway.waiting(r.model_digest) for r in self.store.list()}
        models = [m for m in self.jobs.queue_overview(waiting) if self.governor.allowed(who, m["model"])]
        seen = [{**w, "models": self.governor.visible(who, w.get("models") or []),
                 "loaded": [m for m in w.get("loaded", []) if self.governor.allowed(who, m["name"])]} for w in workers]
        return {"models": models, "workers": seen}

    def search_job(self, job_id: str, query: str, k: int, owner: str | None) -> dict[str, Any]:
        """Embed ``query`` with the embedding job's own model (on a worker), then rank the job's stored vectors:
        the job search of the API and of the console, the one operation that takes two services."""
        model, _ = self.jobs.embed_job(job_id, owner)
        record = self.inference.model(model)
        data, _ = self.inference.single(self.inference.request(record, model, "embed", inputs=[query], truncate=True))
        backend, hits = self.jobs.search(job_id, data["embeddings"][0], k)
        return {"model": model, "query": query, "results": hits, "backend": backend}


def services(app: Flask | None = None) -> Services:
    """The services of ``app``, by default the app handling the current request."""
    found: Services = (app or current_app).extensions["corral"]
    return found
