"""corral deployed on a test network (:mod:`harness.netns`): the processes of a small deployment, each on a host.

- ``db``: PostgreSQL (:mod:`harness.postgres`, a server this cluster starts, never the machine's own) and Redis
  (``redis-server --bind <ip> --save '' --appendonly no``), on their usual ports; with ``with_sentinel``, Redis
  is a primary, a replica and three Sentinels instead (:mod:`harness.redis_sentinel`, :attr:`Cluster.sentinel`)
  and every process's ``REDIS_URL`` names the Sentinels, so that a test can kill the primary and watch the
  failover;
- ``api-a``: ``corral serve``, with the model store;
- ``api-b``: a second ``corral serve`` replica on the same store, started only when a test asks
  (:meth:`Cluster.start_api`): the replica that goes on serving when ``api-a`` is lost;
- ``gpu-1``: ``corral worker``, sharing the API's model store on disk;
- ``gpu-2``: ``corral worker --pull-from http://<api-a>:11434``, with a store of its own filled from the API.

Every process is started with the command a deployment uses, through :class:`harness.stack.Stack` (its settings
in the environment, its log in ``logs/<host>/``); the test process reaches them all over the network's bridge.
Each host's sessions carry its name as their ``application_name`` (the test process's: ``test``), and PostgreSQL
logs every statement that writes (``log_statement = mod``) with its client's address, so a test can tell which
host sent which write, and when (:meth:`Cluster.writes_from`).  A host's database link can be routed through a
proxy (:meth:`Cluster.route_database`, :mod:`harness.tcp_proxy`) before its processes start.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from corral.protocol import worker_key
from corral.settings import Settings
from harness.netns import Host, Network
from harness.postgres import PostgresServer
from harness.processes import die_with_parent, redis_reachable, redis_server_binary, stop
from harness.redis_sentinel import SentinelCluster
from harness.stack import Proc, Stack, fresh_database, wait_for

HOSTS = ("db", "api-a", "api-b", "gpu-1", "gpu-2")
API_PORT = 11434
REDIS_PORT = 6379
POSTGRES_PORT = 5432
DATABASE = "corral"
# "<time> <client address> <application name> [<pid>] LOG:  ...", the application name the client's host.
LOG_SETTINGS = "log_statement = 'mod'\nlog_line_prefix = '%m %h %a [%p] '\nlog_timezone = 'UTC'\n"
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC (\S+) (\S*) \[\d+\] ")


@dataclass
class Worker:
    """A ``corral worker`` on a host, and the name it beats under: ``cpu-<pid>@<host>`` (its host name is the
    host's, and ``ip netns exec`` and ``unshare`` exec the program itself, so the pid started is the worker's)."""

    stack: Stack
    proc: Proc
    host: str

    @property
    def name(self) -> str:
        return f"cpu-{self.proc.proc.pid}@{self.host}"

    def beating(self) -> bool:
        """Whether its heartbeat key is in Redis (it lapses ``heartbeat_ttl`` after the last beat)."""
        return bool(self.stack.redis.exists(worker_key(self.name)))

    def wait(self, timeout: float) -> Worker:
        def ready() -> bool:
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"the worker on {self.host} exited:\n{self.proc.output()}")
            return self.beating()

        wait_for(ready, timeout, f"the worker on {self.host} to beat", interval=0.1)
        return self


@dataclass
class Cluster:
    """The deployment above on ``network``; ``base``: the settings every process shares (TTLs, chunk size),
    whose Redis, database and bind address the cluster fills in; ``with_sentinel``: Redis on ``db`` fails over
    (see the module).  A context manager: everything it started is stopped, and the network removed, on the way
    out."""

    network: Network
    base: Settings
    root: Path
    with_sentinel: bool = False
    postgres: PostgresServer = field(init=False)
    redis_proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    sentinel: SentinelCluster | None = field(default=None, init=False)  # with_sentinel's servers and Sentinels
    stacks: dict[str, Stack] = field(default_factory=dict, init=False)
    workers: dict[str, Worker] = field(default_factory=dict, init=False)  # the latest worker started per host
    database_routes: dict[str, tuple[str, int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        db = self.network["db"]
        self.postgres = PostgresServer(self.root / "pgdata", db.ip, POSTGRES_PORT, prefix=db.prefix)
        if self.with_sentinel:
            self.sentinel = SentinelCluster(self.root / "redis", db.ip, prefix=db.prefix)

    # -- addresses ------------------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.network[name]

    @property
    def redis_url(self) -> str:
        if self.sentinel is not None:
            return self.sentinel.url()
        return f"redis://{self.host('db').ip}:{REDIS_PORT}/0"

    @property
    def api_url(self) -> str:
        return self.url_of("api-a")

    def url_of(self, api: str) -> str:
        """The base URL of the ``corral serve`` on host ``api`` (``api-a``, ``api-b``)."""
        return f"http://{self.host(api).ip}:{API_PORT}"

    def database_url(self, client: str) -> str:
        """The database's URL for ``client`` (a host's name, or ``test``), which PostgreSQL shows as the session's
        ``application_name``; through the address :meth:`route_database` gave the host, if any."""
        host, port = self.database_routes.get(client, (self.postgres.host, self.postgres.port))
        return f"postgresql+psycopg://postgres@{host}:{port}/{DATABASE}?application_name={client}"

    def route_database(self, host: str, address: tuple[str, int]) -> None:
        """Have ``host``'s processes, started from now on, reach PostgreSQL at ``address`` (a proxy)."""
        self.database_routes[host] = address
        self.stacks.pop(host, None)

    def settings_for(self, host: str) -> Settings:
        """The settings of a process on ``host``."""
        models = self.root / f"{host}-models" if host == "gpu-2" else self.base.models_path
        return self.base.model_copy(update={
            "redis_url": self.redis_url, "database_url": self.database_url(host),
            "host": f"{self.host(host).ip}:{API_PORT}", "models_dir": models, "home": self.root / host,
        })

    @property
    def settings(self) -> Settings:
        """The test process's: ``api-a``'s, its sessions named ``test``."""
        return self.settings_for("api-a").model_copy(update={"database_url": self.database_url("test")})

    def stack(self, host: str) -> Stack:
        """The processes on ``host`` (one :class:`Stack` per host, its commands run there)."""
        if host not in self.stacks:
            self.stacks[host] = Stack(self.settings_for(host), self.root / "logs" / host, prefix=self.host(host).prefix)
        return self.stacks[host]

    # -- life -----------------------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self._start_db()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start_db(self) -> None:
        db = self.host("db")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.sentinel is not None:
            self.sentinel.start()  # returns once the Sentinels agree on the primary and see its replica
        else:
            self._start_redis()
        self.postgres.init()
        with open(self.postgres.data_dir / "postgresql.conf", "a") as conf:
            conf.write(LOG_SETTINGS)
        with open(self.postgres.data_dir / "pg_hba.conf", "a") as hba:  # initdb trusts loopback only
            hba.write(f"host all all {self.network.subnet} trust\n")
        self.postgres.start()
        self.postgres.create_database(DATABASE)
        wait_for(lambda: redis_reachable(self.redis_url, timeout=0.5), 20, f"Redis on {db.name}")
        _schema_of_pgoptions(self.settings.database)
        fresh_database(self.settings)

    def _start_redis(self) -> None:
        """One ``redis-server`` on ``db``, its usual port."""
        db = self.host("db")
        log = self.root / "redis.log"
        self.redis_proc = subprocess.Popen(
            db.command(redis_server_binary(), "--bind", db.ip, "--port", str(REDIS_PORT), "--save", "",
                       "--appendonly", "no", "--maxmemory-policy", "noeviction",
                       # no password on a network that exists only inside the test: without this Redis 7 answers
                       # its clients on other hosts only "DENIED ... protected mode"
                       "--protected-mode", "no", "--dir", str(self.root),
                       "--logfile", str(log)),
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
        )

    def start_all(self, timeout: float = 180) -> None:
        """The API and both workers: ``api-a`` and ``gpu-1`` side by side (each takes seconds to import and
        load), then ``gpu-2``, which copies its models from the API once it answers."""
        api = self.spawn_api("api-a")
        first = self.spawn_worker("gpu-1")
        api(timeout)
        second = self.spawn_worker("gpu-2")
        first.wait(timeout)
        second.wait(timeout)

    def spawn_worker(self, host: str) -> Worker:
        """Start ``corral worker`` on ``host`` (``gpu-2``'s with ``--pull-from`` the API); wait on what it
        returns for its first heartbeat."""
        args = ("--pull-from", self.api_url) if host == "gpu-2" else ()
        worker = Worker(self.stack(host), self.stack(host)._spawn("worker", "worker", *args), host)
        self.workers[host] = worker
        return worker

    def start_worker(self, host: str, timeout: float = 180) -> Worker:
        return self.spawn_worker(host).wait(timeout)

    def spawn_api(self, host: str) -> Callable[[float], Proc]:
        """Start ``corral serve`` on ``host`` (``api-a``; ``api-b``, a second replica); the returned call waits
        (up to its timeout) until it answers.  Spawned beside :meth:`start_all`, a replica's start costs no
        wall time of its own."""
        return self.stack(host)._spawn_api()

    def start_api(self, host: str, timeout: float = 180) -> Proc:
        return self.spawn_api(host)(timeout)

    def close(self) -> None:
        """Heal every cut (a process stopping must reach its servers to stop cleanly), stop the processes, the
        servers, then remove the network (which kills whatever is left on a host)."""
        hosts = list(self.network.hosts)
        for name in hosts:
            if self.network.is_isolated(name):
                self.network.rejoin(name)
        for a in hosts:
            for b in hosts:
                if a < b and self.network.is_cut(a, b):
                    self.network.heal(a, b)
        # Every host's processes signalled at once, then waited for: each takes a second or two to stop
        # gracefully, which one host after another added up to about 6 s of a test's teardown.
        running = [proc for stack in self.stacks.values() for proc in stack.procs if proc.proc.poll() is None]
        for proc in running:
            proc.proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.stopped()
        for stack in self.stacks.values():
            stack.stop()  # nothing runs any more: it lets go of its Redis client
        if self.redis_proc is not None:
            stop(self.redis_proc, "redis", timeout=10)
        if self.sentinel is not None:
            self.sentinel.stop()
        try:
            self.postgres.remove()
        except (OSError, subprocess.SubprocessError):
            pass
        from jobs.db import engine_for

        engine_for(self.database_url("test")).dispose()  # this process's connections to a server that is gone
        self.network.remove()

    # -- what the database saw ------------------------------------------------------------------------------

    def writes_from(self, host: str, since: datetime | None = None) -> list[str]:
        """The statements that wrote to the database from ``host``'s address, logged at or after ``since``, in
        order: each with its parameters (the ``DETAIL`` lines PostgreSQL writes with it)."""
        ip = self.host(host).ip
        found: list[str] = []
        keep = False
        for line in self.postgres.log.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            text = line[match.end():] if match else line
            if match and not text.startswith(("DETAIL:", "HINT:", "CONTEXT:", "STATEMENT:")):
                at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=timezone.utc)
                keep = match.group(2) == ip and (since is None or at >= since) and text.startswith("LOG:")
                if keep:
                    found.append(text)
            elif keep:  # the rest of the same message
                found[-1] += "\n" + text
        return found


def missing() -> str | None:
    """What this machine lacks to run a cluster (beside namespaces: :func:`harness.netns.can_make_namespaces`),
    or None."""
    try:
        redis_server_binary()
    except (RuntimeError, ImportError) as exc:
        return str(exc)
    if importlib.util.find_spec("pgserver") is None:
        return "PostgreSQL comes from the pgserver package (the test extra), which is not installed"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "PostgreSQL refuses to run as root and `runuser` (util-linux) is not installed"
    return None


def _schema_of_pgoptions(url: str) -> None:
    """Under xdist the suite names a schema per process in ``PGOPTIONS`` (tests/conftest.py), which this
    process and its children pass to every server they reach: create it here too."""
    match = re.search(r"search_path=(\w+)", os.environ.get("PGOPTIONS", ""))
    if not match:
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {match.group(1)}"))
    finally:
        engine.dispose()
