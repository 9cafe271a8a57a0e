"""Flask front end: Ollama-shaped and OpenAI-shaped HTTP APIs over one set of services.  Never imports llama_cpp."""

from __future__ import annotations

import logging

from flask import Flask

from api.gateway import Gateway
from api.governance import Governor
from api.inference import Inference
from api.services import Services
from corral.broker import Broker
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from jobs.batches import BatchService
from jobs.files import FileStore
from jobs.keys import KeyStore
from jobs.service import JobService

__all__ = ["Services", "create_app"]


def create_app(settings: Settings | None = None) -> Flask:
    """Create and configure the API application."""
    from api import auth, console, encoding, errors, guards, metrics, openapi, scrape
    from api.anthropic import bp as anthropic_bp
    from api.anthropic_batch import bp as anthropic_batch_bp
    from api.jobs import bp as jobs_bp
    from api.ollama import bp as ollama_bp
    from api.openai import bp as openai_bp
    from api.openai_batch import bp as openai_batch_bp
    from api.rerank import bp as rerank_bp
    from api.responses import bp as responses_bp
    from api.vector_stores import bp as vector_stores_bp

    settings = settings or Settings()
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    store = ModelStore(settings.models_path)
    broker = Broker(settings)  # Redis and Celery are made on first use
    gateway = Gateway(settings, broker)
    jobs = JobService(settings, store, broker)
    files = FileStore(settings)
    keys = KeyStore(settings)
    governor = Governor(settings, keys)
    app.extensions["corral"] = Services(
        settings, store, gateway, Inference(settings, store, gateway, governor), jobs, files,
        BatchService(store, jobs, files), governor,
    )
    guards.init_app(app, settings)
    auth.init_app(app, settings, keys)
    encoding.init_app(app, settings)
    errors.init_app(app)
    metrics.init_app(app)
    scrape.init_app(app)
    app.register_blueprint(ollama_bp)
    app.register_blueprint(jobs_bp)
    app.register_blueprint(openai_bp)
    app.register_blueprint(openai_batch_bp)
    app.register_blueprint(responses_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(anthropic_batch_bp)
    app.register_blueprint(rerank_bp)
    app.register_blueprint(vector_stores_bp)
    app.register_blueprint(openapi.bp)
    console.init_app(app)
    logging.getLogger(__name__).debug("API ready, model store %s", store.root)
    return app
