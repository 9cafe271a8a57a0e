"""How every corral process connects to Redis: one place, so the API, the workers and the tools reach the same
server the same way, with the same timeouts, whether ``REDIS_URL`` names one server or a set of Sentinels.

``REDIS_URL`` is redis-py's own form for one server (``redis://``, ``rediss://``, ``unix://``), or, for a primary
that Redis Sentinel fails over, the form the ``limits`` package (Flask-Limiter) uses, with an optional database::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/<master name>[/<db>][?sentinel_password=...]

- each ``host[:port]`` is a Sentinel (port 26379 unless given; ``[::1]:26379`` for IPv6);
- ``master name`` is the name the Sentinels monitor the primary under (``sentinel monitor <name> ...``);
- ``db`` is the database number on the primary (default 0);
- the username and password are the primary's (and its replicas'), as in ``redis://``;
- ``sentinel_password`` (and ``sentinel_username``), the only query parameters, authenticate to the Sentinels,
  which often have no password of their own (sending the primary's to them would then fail).

From it, :func:`redis_client` makes redis-py's ``Sentinel(...).master_for(...)`` (a connection asks the Sentinels
for the primary's address each time it connects, so after a failover it reaches the promoted replica), and
:func:`celery_broker` kombu's ``sentinel://`` transport (:mod:`corral.broker`).  The ``limits`` storage of the
API's rate limits takes the connection pool of a :func:`redis_client` (api/governance.py).

None of these clients retries a command on its own (redis-py 6 and later retry three times with a backoff of up
to 10 s by default): a command that meets a reset connection may have run, and running an ``XADD``, an
``INCRBY`` or an ``LPUSH`` twice duplicates a token or a count; and a retry that lands on a promoted replica
hides the failover from a token stream's reader, which would go on reading the new primary's copy of the stream
without the entries that had not been replicated yet.  Every caller already treats Redis out of reach
(:data:`corral.broker.UNREACHABLE`) as a clear error or a reason to wait, which is what a failover is until a
replica is promoted.  A pooled connection that the server closed is still replaced when it is taken from the
pool (redis-py checks it there), so a restarted Redis costs no error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# The schemes redis-py's from_url takes for a single server.
SERVER_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT = 5.0  # seconds to reach a Redis server
# Seconds a command may go unanswered: a server lost behind a silent network (a partition drops packets, no
# reset comes) would otherwise hold a request thread, or the worker's heartbeat, until TCP gives up (about 15
# minutes).  Far above any command corral sends: the longest block is a 1 s XREAD.
SOCKET_TIMEOUT = 10.0
SENTINEL_TIMEOUT = 2.0  # seconds to reach, and to hear from, one Sentinel before asking the next
HEALTH_CHECK_INTERVAL = 30
_QUERY_KEYS = ("sentinel_username", "sentinel_password")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:/@,]+))(?::(?P<port>\d+))?$")
_MASTER_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RedisUrlError(ValueError):
    """A ``REDIS_URL`` that names no Redis corral can reach; the message says what is wrong and the form."""


SENTINEL_FORM = (
    "redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/<master name>[/<db>]"
    "[?sentinel_password=...]"
)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL: where the Sentinels are and what to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def sentinel_kwargs(self, timeout: float = SENTINEL_TIMEOUT) -> dict[str, Any]:
        """Connection options for the Sentinels themselves: short timeouts, so a Sentinel that is down (a lost
        host's connect hangs rather than being refused) costs seconds before the next one is asked, and their
        own credentials."""
        kwargs: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        if self.sentinel_username is not None:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        return kwargs


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The Sentinels a ``redis+sentinel://`` URL names; None for any other scheme.

    :raises RedisUrlError: a ``redis+sentinel://`` URL that does not follow the form exactly (no Sentinel, a bad
        port, no master name, a database that is not a number, an unknown query parameter, ...).
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        return None

    def bad(why: str) -> RedisUrlError:
        return RedisUrlError(f"bad Sentinel REDIS_URL ({why}); the form is {SENTINEL_FORM}")

    if "#" in rest:
        raise bad("a fragment (#) has no meaning here")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
        if not colon:  # redis:// reads a lone userinfo as the password; say it rather than guess
            raise bad("credentials must be written 'username:password@' or ':password@'")
    if not hosts:
        raise bad("no Sentinel host")
    sentinels: list[tuple[str, int]] = []
    for entry in hosts.split(","):
        m = _HOST_PORT.match(entry.strip())
        if not m:
            raise bad(f"{entry!r} is not host[:port]")
        port = int(m["port"]) if m["port"] else SENTINEL_PORT
        if not 0 < port < 65536:
            raise bad(f"port {port} is out of range")
        sentinels.append((m["v6"] or m["host"], port))
    parts = path.split("/") if path else []
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash
    if not parts or not parts[0]:
        raise bad("no master name after the Sentinels (the name in 'sentinel monitor <name> ...')")
    if len(parts) > 2:
        raise bad(f"the path is /<master name>[/<db>], not /{path}")
    master = unquote(parts[0])
    if not _MASTER_NAME.match(master):
        raise bad(f"master name {master!r} may hold only letters, digits, '_', '-' and '.'")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise bad(f"database {parts[1]!r} is not a number")
        db = int(parts[1])
    options: dict[str, str] = {}
    if query:
        try:
            values = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise bad(f"query {query!r}: {exc}") from None
        for key, found in values.items():
            if key not in _QUERY_KEYS:
                raise bad(f"unknown parameter {key!r} (known: {', '.join(_QUERY_KEYS)})")
            if len(found) > 1:
                raise bad(f"{key} is given twice")
            options[key] = found[0]
    return SentinelUrl(tuple(sentinels), master, db, username, password,
                       options.get("sentinel_username"), options.get("sentinel_password"))


def check_redis_url(url: str) -> str:
    """``url`` itself when corral can connect with it (the setting's validator); a clear error otherwise."""
    if parse_sentinel_url(url) is not None:
        return url
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SERVER_SCHEMES:
        raise RedisUrlError(f"REDIS_URL must start with {', '.join(s + '://' for s in SERVER_SCHEMES)} or "
                            f"{SENTINEL_SCHEME}:// (Sentinel: {SENTINEL_FORM}); got {url.split('://')[0]!r}")
    return url


def redis_client(url: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 socket_timeout: float | None = SOCKET_TIMEOUT) -> redis.Redis:
    """A client with the timeouts every process uses: connect fast, give up on a silent server after
    ``socket_timeout``, no retries of its own (see the module).  For a Sentinel URL, a client of the primary the
    Sentinels name at each connect."""
    options: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": Retry(NoBackoff(), 0),
    }
    target = parse_sentinel_url(url)
    if target is None:
        return redis.Redis.from_url(check_redis_url(url), **options)
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(min(connect_timeout,
                        SENTINEL_TIMEOUT)), db=target.db, username=target.username, password=target.password,
                        **options)
    return sentinel.master_for(target.master_name)


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """(broker URL, transport options) for Celery: ``url`` itself for one server; for Sentinels, kombu's
    ``sentinel://`` transport (one ``sentinel://`` URL per Sentinel, ``;``-separated, each carrying the primary's
    credentials and database) with the master name and the Sentinels' own options."""
    target = parse_sentinel_url(url)
    if target is None:
        return url, {}
    auth = ""
    if target.username is not None or target.password is not None:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    hosts = [f"[{host}]" if ":" in host else host for host, _ in target.sentinels]
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}"
                      for host, (_, port) in zip(hosts, target.sentinels))
    return broker, {"master_name": target.master_name, "sentinel_kwargs": target.sentinel_kwargs()}
