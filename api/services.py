"""The services one app's views share, and the one way a view reaches them (:func:`services`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app

from corral.settings import Settings
from corral.store import ModelStore
from jobs.batches import BatchService
from jobs.files import FileStore
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


def services(app: Flask | None = None) -> Services:
    """The services of ``app``, by default the app handling the current request."""
    found: Services = (app or current_app).extensions["corral"]
    return found
