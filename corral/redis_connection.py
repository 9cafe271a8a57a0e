"""How every corral process connects to Redis: one place, so the API, the workers and the tools reach the same
server the same way, with the same timeouts."""

from __future__ import annotations

import redis


def redis_client(url: str) -> redis.Redis:
    """A client with the timeouts every process uses (connect fast, block reads as long as asked)."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
