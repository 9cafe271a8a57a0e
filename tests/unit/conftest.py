"""Fixtures of the unit tier: nothing here starts a process or needs Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.models import Base


@pytest.fixture()
def session(tmp_path: Path) -> Iterator[Session]:
    """A session on a fresh SQLite file with the job tables (the state machine's and the dispatcher's tests)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    with sessionmaker(engine, expire_on_commit=False)() as s:
        yield s
    engine.dispose()
