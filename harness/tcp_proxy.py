"""A small TCP proxy on loopback that a test can cut, heal and slow down: the harness's stand-in for a network
fault between a process and a server it talks to (issue #38's Redis outage and slow link).

:class:`TcpProxy` listens on ``127.0.0.1:<port>`` and pipes each connection to ``target``.  One thread runs
everything (a selector over the listener and every socket), so nothing races and :meth:`TcpProxy.close` leaves
no thread or socket behind.

- :meth:`~TcpProxy.cut`: every open connection is reset (RST, as a lost host's peer sees it once it answers
  again) and the listener closed, so new connections are refused (``ECONNREFUSED``, as clients of a lost Redis
  primary saw it);
- :meth:`~TcpProxy.heal`: listen again on the same port;
- :meth:`~TcpProxy.delay`: hold the bytes of one direction (``up``: client to target, ``down``: back) or both
  for so many milliseconds before passing them on, in order.

Stdlib only: the harness imports nothing of corral's for it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("corral.harness.proxy")

Direction = Literal["up", "down", "both"]
_CHUNK = 65536
_CONNECT_TIMEOUT = 2.0


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (SO_LINGER 0) rather than a FIN: the peer's next read or write fails at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class _Flow:
    """One direction of a connection: bytes read from ``src``, held until due, written to ``dst``."""

    src: socket.socket
    dst: socket.socket
    held: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)  # (due, data)
    out: bytearray = field(default_factory=bytearray)  # due, not yet accepted by dst
    eof: bool = False  # src has closed: once everything held is written, the connection ends


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    up: _Flow = field(init=False)
    down: _Flow = field(init=False)

    def __post_init__(self) -> None:
        self.up = _Flow(self.client, self.upstream)
        self.down = _Flow(self.upstream, self.client)


class TcpProxy:
    """``127.0.0.1:port`` -> ``target``; a context manager (started on entry, closed on exit)."""

    def __init__(self, target: tuple[str, int], port: int = 0, host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self._delay = {"up": 0.0, "down": 0.0}  # seconds
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._commands: collections.deque[tuple[Callable[[], None], threading.Event]] = collections.deque()
        self._pairs: dict[socket.socket, tuple[_Pair, _Flow]] = {}  # each socket -> its pair, the flow it reads
        self._listener: socket.socket | None = None
        self.accepted: int = 0  # connections accepted in all (a test can tell that clients came back)
        self._closing: bool = False
        self._listen(port)
        assert self._listener is not None
        self.port: int = self._listener.getsockname()[1]
        self._thread: threading.Thread = threading.Thread(target=self._loop, name=f"tcp-proxy-{self.port}",
                                                          daemon=True)
        self._thread.start()

    # -- the test's side ---------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    def open_connections(self) -> int:
        return len(self._pairs) // 2

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`heal`."""
        self._call(self._cut)

    def heal(self) -> None:
        """Accept connections again, on the same port."""
        self._call(lambda: self._listen(self.port))

    def delay(self, ms: float, direction: Direction = "both") -> None:
        """Hold each direction's bytes ``ms`` milliseconds before passing them on (0: none)."""
        for name in ("up", "down") if direction == "both" else (direction,):
            self._delay[name] = max(0.0, ms) / 1000.0

    def close(self) -> None:
        """Stop the thread and close every socket (idempotent)."""
        if not self._thread.is_alive():
            return
        self._closing = True
        self._wake()
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the TCP proxy's thread did not stop")

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the loop's side ---------------------------------------------------------------------------------

    def _call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the loop thread and wait for it (the selector and the sockets are the loop's)."""
        if not self._thread.is_alive():
            raise RuntimeError("the TCP proxy is closed")
        done = threading.Event()
        self._commands.append((command, done))
        self._wake()
        if not done.wait(10):
            raise RuntimeError("the TCP proxy's thread did not answer")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # its buffer is full: the loop is awake anyway
            pass

    def _listen(self, port: int) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, port))
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, None)

    def _cut(self) -> None:
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        pairs = {id(pair): pair for pair, _ in self._pairs.values()}
        for pair in pairs.values():
            self._drop(pair, reset=True)
        log.info("proxy %d -> %s:%d cut (%d connection(s) reset)", self.port, *self.target, len(pairs))

    def _loop(self) -> None:
        try:
            while not self._closing:
                for key, events in self._sel.select(self._timeout()):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        self._drain_wake()
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        pair, flow = self._pairs[sock]
                        if events & selectors.EVENT_READ:
                            self._read(pair, flow)
                        if events & selectors.EVENT_WRITE and sock in self._pairs:
                            self._flush(pair, self._flow_into(pair, sock))
                self._release_due()
        finally:
            for _, done in self._commands:  # a caller still waiting: the proxy is closed
                done.set()
            pairs = {id(pair): pair for pair, _ in self._pairs.values()}
            for pair in pairs.values():
                self._drop(pair, reset=True)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while self._commands:
            command, done = self._commands.popleft()
            try:
                command()
            except OSError:
                log.exception("proxy %d: command failed", self.port)
            finally:
                done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
        except OSError as exc:  # the target is down itself: the client sees its connection dropped
            log.info("proxy %d: cannot reach %s:%d (%s)", self.port, *self.target, exc)
            _reset(client)
            return
        self.accepted += 1
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, upstream)
        self._pairs[client] = (pair, pair.up)
        self._pairs[upstream] = (pair, pair.down)
        self._sel.register(client, selectors.EVENT_READ, None)
        self._sel.register(upstream, selectors.EVENT_READ, None)

    @staticmethod
    def _flow_into(pair: _Pair, sock: socket.socket) -> _Flow:
        return pair.down if sock is pair.client else pair.up

    def _read(self, pair: _Pair, flow: _Flow) -> None:
        try:
            data = flow.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pair, reset=True)
            return
        name = "up" if flow is pair.up else "down"
        last_due = flow.held[-1][0] if flow.held else 0.0
        due = max(time.monotonic() + self._delay[name], last_due)  # in order, whatever the delay did meanwhile
        flow.held.append((due, data))  # b"": the end, passed on in its turn
        if not data:
            flow.eof = True
            self._watch(pair, flow.src)

    def _timeout(self) -> float | None:
        dues = [flow.held[0][0] for _, flow in self._pairs.values() if flow.held]
        if not dues:
            return None
        return max(0.0, min(dues) - time.monotonic())

    def _release_due(self) -> None:
        now = time.monotonic()
        for pair, flow in list(self._pairs.values()):
            if flow.src not in self._pairs:
                continue  # dropped meanwhile
            moved = False
            while flow.held and flow.held[0][0] <= now:
                flow.out += flow.held.popleft()[1]
                moved = True
            if moved:
                self._flush(pair, flow)

    def _flush(self, pair: _Pair, flow: _Flow) -> None:
        while flow.out:
            try:
                sent = flow.dst.send(flow.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(pair, reset=True)
                return
            del flow.out[:sent]
        if flow.eof and not flow.held and not flow.out:  # all the closed side sent has been passed on: the end
            self._drop(pair, reset=False)
            return
        self._watch(pair, flow.dst)

    def _watch(self, pair: _Pair, sock: socket.socket) -> None:
        """Select ``sock`` for reading while its side is open, for writing while bytes wait for it."""
        reads = self._pairs[sock][1]  # the flow this socket is the source of
        writes = self._flow_into(pair, sock)
        events = (0 if reads.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if writes.out else 0)
        registered = sock in self._sel.get_map()
        if events and registered:
            self._sel.modify(sock, events)
        elif events:
            self._sel.register(sock, events)
        elif registered:
            self._sel.unregister(sock)

    def _drop(self, pair: _Pair, *, reset: bool) -> None:
        for sock in (pair.client, pair.upstream):
            self._pairs.pop(sock, None)
            if sock in self._sel.get_map():
                self._sel.unregister(sock)
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
