"""Timestamps in Go's RFC3339Nano, the form Ollama's JSON uses."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

# What Go prints for "never expires" (time.Now() + the largest Duration): far in the future, as Ollama does.
_FOREVER = timedelta(days=365 * 292)


def rfc3339(moment: datetime) -> str:
    """``2023-08-04T19:22:45.499127Z`` for UTC, ``...-07:00`` otherwise; trailing zeros trimmed."""
    text = moment.isoformat(timespec="microseconds")
    head, _, rest = text.partition(".")
    frac, offset = rest[:6], rest[6:]
    frac = frac.rstrip("0")
    if offset in ("+00:00", "") and moment.utcoffset() == timedelta(0):
        offset = "Z"
    return f"{head}.{frac}{offset}" if frac else f"{head}{offset}"


def utc_now() -> str:
    return rfc3339(datetime.now(timezone.utc))


def local_from_epoch(epoch: float) -> str:
    """A local timestamp for ``expires_at``; ``inf`` means forever."""
    if math.isinf(epoch):
        return rfc3339((datetime.now(timezone.utc) + _FOREVER).astimezone())
    return rfc3339(datetime.fromtimestamp(epoch, tz=timezone.utc).astimezone())


def duration_seconds(text: str) -> int:
    """``90s``, ``30m``, ``1h``, ``24h``, ``7d``: a key's budget period, a job's completion window."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r}: expected a number and s, m, h or d (90m, 1h, 24h, 7d)")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
