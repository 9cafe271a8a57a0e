"""The chaos soak's deployment (bench/chaos.py): :mod:`harness.cluster`'s hosts with Redis behind Sentinels, and
the result-write audit trigger in its database.

Why a subclass still: ``Cluster(with_sentinel=True)`` gives the Sentinel-managed primary and replica the soak
fails over, and every process's ``REDIS_URL`` names the three Sentinels; what the soak adds is its audit.  The
trigger (:data:`AUDIT_DDL`) logs every transition of an item into ``succeeded`` or ``failed`` (a result written:
the worker's conditional write, jobs/transitions.py ``write_result``) into ``chaos_result_writes``, so an item
whose result was written twice is seen by the audit (bench/chaos_audit.py) even if the second write overwrote the
first.  It lives in the database, so it survives the soak's PostgreSQL restarts.  And PostgreSQL's statement log,
which the fault tests read, is turned off: over a soak's tens of thousands of writes it would fill the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.cluster import Cluster
from harness.processes import free_port
from harness.redis_sentinel import SentinelCluster

GPUS = ("gpu-1", "gpu-2")
HOSTS = ("db", "api-a", *GPUS)  # the soak's hosts: harness.cluster's but api-b, which it does not start
TTL = 2.0  # heartbeat_ttl: as the multi-host tests
CHUNK = 8  # items per chunk
QUEUE_TIMEOUT = 120.0  # an interactive request waits this long for a worker, then a 503 (the default: 600)
AUDIT_DDL = """
CREATE TABLE chaos_result_writes (
    id bigserial PRIMARY KEY, item_id bigint NOT NULL, job_id text NOT NULL, old_state text, new_state text,
    claim text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX chaos_result_writes_item ON chaos_result_writes (item_id);
CREATE FUNCTION chaos_result_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_result_writes (item_id, job_id, old_state, new_state, claim)
    VALUES (NEW.id, NEW.job_id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END, NEW.state,
            CASE WHEN TG_OP = 'UPDATE' THEN OLD.claim END);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_result_update AFTER UPDATE ON job_items FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN ('succeeded', 'failed'))
    EXECUTE FUNCTION chaos_result_write();
CREATE TRIGGER chaos_result_insert AFTER INSERT ON job_items FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed'))
    EXECUTE FUNCTION chaos_result_write();
"""


@dataclass
class ChaosCluster(Cluster):
    """:class:`harness.cluster.Cluster` with Redis on ``db`` as a Sentinel-managed primary and replica, the
    result-write audit trigger in its database and no statement log."""

    with_sentinel: bool = True
    shared_buffers: str | None = None  # PostgreSQL's, when not its default (128MB)

    def __enter__(self) -> ChaosCluster:
        super().__enter__()
        return self

    @property
    def redis(self) -> SentinelCluster:
        """Redis's servers and Sentinels on ``db`` (the failover fault's and the process watch's)."""
        assert self.sentinel is not None, "a ChaosCluster's Redis is always the Sentinels'"
        return self.sentinel

    def _start_db(self) -> None:
        super()._start_db()
        engine = create_engine(self.settings.database)
        try:
            with engine.begin() as conn:
                conn.execute(text(AUDIT_DDL))
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                # ALTER SYSTEM (postgresql.auto.conf): it outlives the soak's restarts of the server
                conn.execute(text("ALTER SYSTEM SET log_statement = 'none'"))
                if self.shared_buffers:  # ALTER SYSTEM takes no parameters: a literal, checked
                    if not re.fullmatch(r"\d+(kB|MB|GB)?", self.shared_buffers):
                        raise ValueError(f"shared_buffers: {self.shared_buffers!r} is not a size such as 16MB")
                    conn.execute(text(f"ALTER SYSTEM SET shared_buffers = '{self.shared_buffers}'"))
                conn.execute(text("SELECT pg_reload_conf()"))
        finally:
            engine.dispose()
        if self.shared_buffers:  # a setting read at the server's start only
            self.postgres.stop("fast")
            self.postgres.start()


def base_settings(root: Path) -> Settings:
    """What every process of the soak shares: short TTLs (faults are noticed in seconds), small chunks (a fault
    lands mid-chunk), one thread per worker (2 cores), an interactive queue timeout of :data:`QUEUE_TIMEOUT`."""
    models = root / "models"
    ensure_defaults(ModelStore(models))
    return Settings(home=root / "home", redis_url=None, models_dir=models, host=f"127.0.0.1:{free_port()}",
                    database_url=f"sqlite:///{root / 'unused.db'}", heartbeat_ttl=TTL, reconcile_interval=1.0,
                    chunk_size=CHUNK, queue_timeout=QUEUE_TIMEOUT, worker_threads=1)
