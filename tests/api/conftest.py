"""The API tier: the Flask app in-process, on its own SQLite database, with no Redis and no worker.

``create_app`` makes its Redis client and Celery app on first use, so everything a request answers before it
queues work (validation, listings, model facts, errors, CORS, keys, the OpenAPI document) is tested here in
milliseconds.  A request that does reach for Redis fails loudly: ``REDIS_URL`` is not set in this tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from corral.settings import Settings
from jobs.db import upgrade
from tests.helpers import make_settings


class BufferedClient(FlaskClient):
    """A test client whose responses are read whole and closed before a test sees them, as a WSGI server closes
    them: a streamed file (a blob) is never left open for the garbage collector (warnings are errors)."""

    def open(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


Flask.test_client_class = BufferedClient  # every app this tier makes, whichever fixture or test builds it


@pytest.fixture(scope="session")
def settings(session_dir: Path, models_dir: Path) -> Settings:
    """Overrides the session's stack settings for this tier: SQLite in the session directory, no Redis."""
    home = session_dir / "api-home"
    s = make_settings(home, None, models_dir, database_url=f"sqlite:///{session_dir / 'api.db'}")
    upgrade(s)
    return s
