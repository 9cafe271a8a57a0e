"""Hosts on a private network inside one machine: Linux network namespaces joined by a bridge (issue #38).

A :class:`Network` stands for a small deployment's machines (``db``, ``api-a``, ``gpu-1``...): each host is a
network namespace with its own loopback, its own port space and one interface, ``eth0``, on a /24 that exists only
inside the test (a random ``10.x.y.0/24`` that overlaps no route of the machine), bridged to its peers.  The
bridge itself has the subnet's first address, so the test process, in the machine's own namespace, reaches every
host as a client on the network would.  A process started on a host (:meth:`Host.command`) sees only that host's
network, and its own host name (a UTS namespace of its own, so a worker is named ``cpu-<pid>@gpu-1``).

Faults:

- :meth:`Network.cut` / :meth:`Network.heal`: one pair of hosts stops hearing the other, and only that pair.  Each
  side's neighbour entry for the other is pinned to a MAC address nobody has, so frames go out and vanish, as on a
  partitioned switch: an open TCP connection retransmits into the void (no RST, no error), a new one gets no answer
  to its SYN.  (Neither nftables nor tc's actions need exist for this: the machine may have neither.)
- :meth:`Network.isolate` / :meth:`Network.rejoin`: a host cut from every peer and from the machine's own
  namespace at once;
- :meth:`Host.kill_all`: SIGKILL every process whose network namespace is the host's, a host that loses power.

Names are short and random (``corral-<6 hex>-<host>`` for namespaces, 15 characters at most for interfaces), so
parallel test processes never collide; leaving the context removes every process, namespace and link it made,
pass or fail.  Root only (or the capabilities to make namespaces): :func:`can_make_namespaces` says whether this
machine allows it, and why not.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("corral.harness.netns")

# Where a cut pair's frames go: a locally administered unicast MAC address no interface has.
NOWHERE_MAC = "02:00:5e:00:de:ad"
_SUBNET_TRIES = 64


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def can_make_namespaces() -> tuple[bool, str]:
    """Whether this process can make network namespaces, a bridge and veth pairs; (False, why) when not."""
    if not shutil.which("ip"):
        return False, "the `ip` command (iproute2) is not installed"
    if not shutil.which("unshare"):
        return False, "the `unshare` command (util-linux) is not installed"
    if os.geteuid() != 0:
        return False, "making network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    suffix = secrets.token_hex(3)
    ns, bridge, veth = f"corral-probe-{suffix}", f"cb{suffix}", f"cv{suffix}"
    try:
        for args in (["netns", "add", ns], ["link", "add", bridge, "type", "bridge"],
                     ["link", "add", veth, "type", "veth", "peer", "name", f"cp{suffix}"],
                     ["link", "set", f"cp{suffix}", "netns", ns]):
            done = _ip(*args, check=False)
            if done.returncode != 0:
                return False, f"`ip {' '.join(args)}` failed: {done.stderr.strip()}"
        return True, ""
    finally:
        _ip("link", "del", veth, check=False)
        _ip("link", "del", bridge, check=False)
        _ip("netns", "del", ns, check=False)


@dataclass
class Host:
    """One machine of the network: a namespace with ``eth0`` at ``ip``."""

    name: str
    netns: str
    ip: str
    mac: str
    veth: str  # the bridge's end of the host's cable, in the machine's own namespace

    @property
    def prefix(self) -> list[str]:
        """The words before a command that run it on this host (its network, and its host name)."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name]

    def command(self, *argv: str) -> list[str]:
        """``argv`` run on this host (``exec``-ed all the way: the process started is the program itself)."""
        return [*self.prefix, *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a short command in the host's network namespace (network plumbing: no host name of its own)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], check=True, capture_output=True,
                              text=True, timeout=timeout)

    def pids(self) -> list[int]:
        """Every live process whose network namespace is this host's."""
        done = _ip("netns", "pids", self.netns, check=False)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def kill_all(self, timeout: float = 10) -> list[int]:
        """SIGKILL every process on the host (a lost machine); their pids, once all are gone."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return killed
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes on {self.name} outlived SIGKILL: {pids}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                if pid not in killed:
                    killed.append(pid)
            time.sleep(0.05)


@dataclass
class Network:
    """Hosts on a bridge; a context manager that makes them on entry and removes them all on exit."""

    names: Iterable[str]
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    subnet: ipaddress.IPv4Network = field(init=False)
    bridge: str = field(init=False)
    suffix: str = field(default_factory=lambda: secrets.token_hex(3), init=False)
    _cut: set[frozenset[str]] = field(default_factory=set, init=False)
    _isolated: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.bridge = f"cb{self.suffix}"
        self.subnet = _free_subnet()

    @property
    def bridge_ip(self) -> str:
        """The address the machine's own namespace (the test process) has on the network."""
        return str(self.subnet[1])

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        try:
            self._make()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.remove()

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, name in enumerate(self.names):
            ip = str(self.subnet[10 + index])
            mac = f"02:c0:{self.suffix[:2]}:{self.suffix[2:4]}:{self.suffix[4:]}:{index + 1:02x}"
            host = Host(name, f"corral-{self.suffix}-{name}", ip, mac, f"cv{self.suffix}{index}")
            self.hosts[name] = host
            peer = f"cp{self.suffix}{index}"
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            for args in (["link", "set", "lo", "up"], ["link", "set", peer, "name", "eth0"],
                         ["link", "set", "eth0", "address", mac],
                         ["addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0"],
                         ["link", "set", "eth0", "up"]):
                host.run("ip", *args)
        log.info("network %s: %s", self.subnet, ", ".join(f"{h.name} {h.ip}" for h in self.hosts.values()))

    # -- faults ---------------------------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        """``a`` and ``b`` stop hearing each other (each sends the other's frames nowhere); other pairs go on."""
        for here, there in ((self[a], self[b]), (self[b], self[a])):
            here.run("ip", "neigh", "replace", there.ip, "lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent")
        self._cut.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        """Undo :meth:`cut`: each side's entry for the other is its real address again."""
        for here, there in ((self[a], self[b]), (self[b], self[a])):
            here.run("ip", "neigh", "replace", there.ip, "lladdr", there.mac, "dev", "eth0", "nud", "reachable")
        self._cut.discard(frozenset((a, b)))

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._cut

    def isolate(self, name: str) -> None:
        """``name`` hears nobody and nobody hears it: cut from every host and from the machine's own namespace
        (the bridge's address: the test process, and anything it runs there, such as a proxy)."""
        for other in self.hosts:
            if other != name and not self.is_cut(name, other):
                self.cut(name, other)
        host = self[name]
        host.run("ip", "neigh", "replace", self.bridge_ip, "lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent")
        _ip("neigh", "replace", host.ip, "lladdr", NOWHERE_MAC, "dev", self.bridge, "nud", "permanent")
        self._isolated.add(name)

    def rejoin(self, name: str) -> None:
        """Undo :meth:`isolate`."""
        for other in self.hosts:
            if other != name and self.is_cut(name, other):
                self.heal(name, other)
        host = self[name]
        host.run("ip", "neigh", "del", self.bridge_ip, "dev", "eth0")
        _ip("neigh", "del", host.ip, "dev", self.bridge)
        self._isolated.discard(name)

    def is_isolated(self, name: str) -> bool:
        return name in self._isolated

    # -- teardown -------------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Kill every process on every host, then delete the namespaces (their ends of the veth pairs go with
        them, and so the bridge's ends) and the bridge; idempotent."""
        for host in self.hosts.values():
            try:
                host.kill_all()
            except RuntimeError:
                log.exception("cannot empty host %s", host.name)
        for host in self.hosts.values():
            _ip("link", "del", host.veth, check=False)
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.hosts.clear()

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network that still exist (none once :meth:`remove` has run)."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        found = [n for n in names if n.startswith(f"corral-{self.suffix}-")]
        found += [word.split("@")[0] for word in links.replace(":", " ").split()
                  if word.startswith((f"cb{self.suffix}", f"cv{self.suffix}"))]
        return found


def _free_subnet() -> ipaddress.IPv4Network:
    """A random ``10.x.y.0/24`` overlapping no address or route of the machine's own namespace."""
    taken = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:  # "default" and the like
            continue
    for _ in range(_SUBNET_TRIES):
        candidate = ipaddress.IPv4Network(f"10.{secrets.randbelow(156) + 100}.{secrets.randbelow(256)}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 for a test network")
