"""The chaos soak's deployment (bench/chaos.py): :mod:`harness.cluster`'s hosts, Redis behind Sentinels, and the
result-write audit trigger in its database.

Why a subclass of its own: the soak fails Redis over, which needs a primary, a replica and three Sentinels on
``db`` and every process's ``REDIS_URL`` naming the Sentinels (``redis+sentinel://``); ``Cluster`` starts one
plain ``redis-server``.  When ``harness.cluster`` grows a Sentinel option of its own, :class:`ChaosCluster` keeps
only the trigger.

The trigger (:data:`AUDIT_DDL`) logs every transition of an item into ``succeeded`` or ``failed`` (a result
written: the worker's conditional write, jobs/transitions.py ``write_result``) into ``chaos_result_writes``, so an
item whose result was written twice is seen by the audit (bench/chaos_audit.py) even if the second write
overwrote the first.  It lives in the database, so it survives the soak's PostgreSQL restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from corral.modelstore.catalog import ensure_defaults
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.cluster import LOG_SETTINGS, Cluster, _schema_of_pgoptions
from harness.processes import free_port, redis_reachable
from harness.redis_sentinel import SentinelCluster
from harness.stack import fresh_database, wait_for

GPUS = ("gpu-1", "gpu-2")
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
    """:class:`harness.cluster.Cluster` with Redis on ``db`` as a Sentinel-managed primary and replica (the
    processes' ``REDIS_URL`` names the three Sentinels), and the result-write audit trigger in its database."""

    sentinel: SentinelCluster = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        db = self.host("db")
        self.sentinel = SentinelCluster(self.root / "redis", db.ip, prefix=db.prefix)

    @property
    def redis_url(self) -> str:
        return self.sentinel.url()

    def __enter__(self) -> ChaosCluster:
        super().__enter__()
        return self

    def _start_db(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.sentinel.start()
        self.postgres.init()
        with open(self.postgres.data_dir / "postgresql.conf", "a") as conf:
            # the statement log of the fault tests would fill the disk in a soak: connections and errors only
            conf.write(LOG_SETTINGS.replace("log_statement = 'mod'", "log_statement = 'none'"))
        with open(self.postgres.data_dir / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.network.subnet} trust\n")
        self.postgres.start()
        self.postgres.create_database("corral")
        wait_for(lambda: redis_reachable(self.redis_url, timeout=0.5), 20, "Redis (Sentinels) on db")
        _schema_of_pgoptions(self.settings.database)
        fresh_database(self.settings)
        engine = create_engine(self.settings.database)
        try:
            with engine.begin() as conn:
                conn.execute(text(AUDIT_DDL))
        finally:
            engine.dispose()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sentinel.stop()


def base_settings(root: Path) -> Settings:
    """What every process of the soak shares: short TTLs (faults are noticed in seconds), small chunks (a fault
    lands mid-chunk), one thread per worker (2 cores), an interactive queue timeout of :data:`QUEUE_TIMEOUT`."""
    models = root / "models"
    ensure_defaults(ModelStore(models))
    return Settings(home=root / "home", redis_url=None, models_dir=models, host=f"127.0.0.1:{free_port()}",
                    database_url=f"sqlite:///{root / 'unused.db'}", heartbeat_ttl=TTL, reconcile_interval=1.0,
                    chunk_size=CHUNK, queue_timeout=QUEUE_TIMEOUT, worker_threads=1)
