"""One thread per process makes every ``llama_decode`` call: a worker's llama.cpp compute never changes thread.

Why it matters: the CPU build of llama.cpp runs its graphs on OpenMP (libgomp).  Each thread that starts a
parallel region becomes the master of its own team, whose worker threads live as long as that master does,
and libgomp counts them all.  Once a process holds more OpenMP threads than it has CPUs (two Celery task
threads that each embedded once, or a decode loop plus one embedding request), libgomp throttles its
barrier spinning to 100 spins, and each of the hundreds of barriers in one decode becomes a futex sleep and
wake-up.  Measured on this project's 2-core VM (raw batched decode, 16 sequences, 2 threads): 148 tok/s
when one thread does all the decoding, 65-80 tok/s once a second thread has decoded before
(``OMP_WAIT_POLICY=ACTIVE`` only raises the throttled count to 1000 spins: 75 tok/s).  Which thread decodes
does not matter; that it is always the same one does.

So the decode loop of every chat model and the embedding packer of every embedding model hand their
``llama_decode`` calls to :func:`run`, which executes them on one long-lived thread.  The calls were
serialised in effect anyway (one process, a handful of cores or one GPU); the hop costs two thread
wake-ups per decode, tens of microseconds against milliseconds of compute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def _remember_thread() -> None:
    global _ident
    _ident = threading.get_ident()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="corral-compute", initializer=_remember_thread
            )
        return _executor


def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``fn`` on the process's compute thread and return its result (or raise its exception)."""
    if threading.get_ident() == _ident:
        return fn(*args, **kwargs)
    return _pool().submit(fn, *args, **kwargs).result()


def compute_thread_ident() -> int | None:
    """The compute thread's identifier, once it has started (tests check that decodes ran there)."""
    return _ident
