"""Reader leases kept alive by the process, not by the reply: one thread per API process renews every lease it
holds.

A reply's reader holds ``corral:reader:<request id>`` (corral/protocol.py) so that the worker can stop a
generation nobody reads any more: the API process was killed, or its host lost.  Renewing from the reading loop
would tie the lease to how fast the client reads: a client that pauses (a paused UI, ``curl | less``) fills
the socket buffers, the response write blocks, the loop stops, the lease lapses and a live client's reply is
cut.  The lease says "this process is alive and still wants the reply", so the process renews it, with one
pipeline of ``PEXPIRE``s a third of a lease apart.  A Redis outage lets the leases lapse; the replies meeting
it fail anyway.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)


class LeaseKeeper:
    """The leases one process holds, each a (Redis client, key, milliseconds), renewed by a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[Any, int]] = {}
        self._wake = threading.Event()
        self._pid = -1  # the thread belongs to the process that started it (a forked child starts its own)

    def hold(self, client: Any, key: str, ms: int) -> None:
        """Keep ``key`` alive (it is set already) until :meth:`drop`."""
        with self._lock:
            if self._pid != os.getpid():
                self._leases.clear()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="corral-leases", daemon=True).start()
            self._leases[key] = (client, ms)

    def drop(self, key: str) -> None:
        with self._lock:
            self._leases.pop(key, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def _run(self) -> None:
        pid = os.getpid()
        while os.getpid() == pid:
            with self._lock:
                leases = list(self._leases.items())
            shortest = min((ms for _, (_, ms) in leases), default=3000)
            self._wake.wait(shortest / 3000)
            by_client: dict[int, tuple[Any, list[tuple[str, int]]]] = {}
            for key, (client, ms) in leases:
                by_client.setdefault(id(client), (client, []))[1].append((key, ms))
            for client, keys in by_client.values():
                try:
                    pipe = client.pipeline(transaction=False)
                    for key, ms in keys:
                        pipe.pexpire(key, ms)
                    pipe.execute()
                except Exception as exc:  # Redis out of reach: the leases lapse, as the replies fail
                    log.debug("lease renewal failed: %s", exc)


KEEPER = LeaseKeeper()
