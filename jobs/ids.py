"""The ids of stored objects: a prefix that says what it names, then random hex, in the shapes their APIs use.

One module, so every id is made one way and modules that store objects (jobs, keys, files, batches, webhooks)
need not import each other for it.  ``job_...``/``key_...`` carry 96 random bits; the OpenAI-shaped ids
(``file-...``, ``batch_...``, ``evt_...``, ``msg_...``) keep OpenAI's and the Standard Webhooks spec's look of 24
hex characters.  Chunk ids come by the thousand for one upload, so they share a random stem and count.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable


def new_id(prefix: str) -> str:
    """``prefix_`` and 96 random bits in hex: ``job_...``, ``key_...``."""
    return f"{prefix}_{os.urandom(12).hex()}"


def openai_id(prefix: str) -> str:
    """``prefix`` (with its own separator: ``file-``, ``batch_``, ``evt_``, ``msg_``) and 24 random hex characters."""
    return prefix + os.urandom(12).hex()


def chunk_id_maker() -> Callable[[], str]:
    """New chunk ids for one job: one random 64-bit stem (``os.urandom`` costs ~30 us a call on this project's
    VM: 62,500 calls for a million-line upload) and a counter."""
    stem, counter = os.urandom(8).hex(), itertools.count()
    return lambda: f"chunk_{stem}{next(counter):08x}"
