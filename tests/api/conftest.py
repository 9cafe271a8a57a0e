"""The API tier: the Flask app in-process, on its own SQLite database, with no Redis and no worker.

``create_app`` makes its Redis client and Celery app on first use, so everything a request answers before it
queues work (validation, listings, model facts, errors, CORS, keys, the OpenAPI document) is tested here in
milliseconds.  A request that does reach for Redis fails loudly: ``REDIS_URL`` is not set in this tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.settings import Settings
from jobs.db import upgrade
from tests.helpers import make_settings


@pytest.fixture(scope="session")
def settings(session_dir: Path, models_dir: Path) -> Settings:
    """Overrides the session's stack settings for this tier: SQLite in the session directory, no Redis."""
    home = session_dir / "api-home"
    s = make_settings(home, None, models_dir, database_url=f"sqlite:///{session_dir / 'api.db'}")
    upgrade(s)
    return s
