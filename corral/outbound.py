"""Requests this server makes to URLs that others chose: webhook receivers and model registries.

The invariant: an outbound request never reaches a loopback, link-local, private, multicast, unspecified or
reserved address unless a setting allows it (``CORRAL_WEBHOOK_ALLOW_NETWORKS`` for webhooks; for ``pull``, a host
that ``CORRAL_PULL_HOSTS`` names without a wildcard).  Otherwise whoever may submit a URL could make the server
call its own Redis, the cloud metadata service at 169.254.169.254 or anything else on its network, and read the
outcome back from an error message.

Two checks hold it:

* :func:`check_url` parses a URL strictly before it is stored or used: http(s) only, no control characters or
  whitespace, no ``user:pass@``, and a host that is a DNS name, a dotted-quad IPv4 address or a bracketed IPv6
  address.  Other IPv4 spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``), which ``getaddrinfo`` would
  quietly turn into 127.0.0.1, are refused.
* :class:`GuardedTransport` and :class:`AsyncGuardedTransport` resolve the host of every request at connect
  time, check every address it resolves to, and connect to the checked address (the ``Host`` header and the TLS
  server name keep the original host, so certificates are still verified against it).  A name that resolved to
  a public address when it was submitted and to 127.0.0.1 now (DNS rebinding) is refused here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2000
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")  # what inet_aton reads as a number, as WHATWG does
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class RefusedURL(ValueError):
    """A URL :func:`check_url` will not use; the message says why, in words fit for the one who sent it."""


class AddressNotAllowed(httpx.TransportError):
    """A request's host resolves to an address the policy refuses: raised before any connection is made.

    An :class:`httpx.TransportError`, so callers that handle httpx's failures handle this one too."""


@dataclass(frozen=True)
class Policy:
    """Which addresses outbound requests may reach beyond the public internet.

    ``networks``: addresses in these are allowed whatever they are (a receiver on this host or network).
    ``trusted_hosts``: host names (lower case) an administrator named, which may resolve anywhere.
    ``unrestricted``: no check at all (a caller that was given no policy to apply)."""

    networks: tuple[IPNetwork, ...] = ()
    trusted_hosts: frozenset[str] = field(default_factory=frozenset)
    unrestricted: bool = False

    @classmethod
    def allowing(cls, networks: Iterable[str] = (), trusted_hosts: Iterable[str] = ()) -> Policy:
        return cls(tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()),
                   frozenset(h.lower() for h in trusted_hosts))

    def permits(self, host: str, address: IPAddress) -> bool:
        if self.unrestricted or host.lower() in self.trusted_hosts:
            return True
        address = _embedded_ipv4(address) or address
        if any(address in network for network in self.networks):
            return True
        return is_public(address)


UNRESTRICTED = Policy(unrestricted=True)


def is_public(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not loopback, link-local, private (RFC 1918, ULA, CGNAT),
    multicast, unspecified, reserved or documentation space.  An IPv6 address that embeds an IPv4 one
    (``::ffff:127.0.0.1``, 6to4, NAT64) is judged by the IPv4 address."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        return is_public(embedded)
    return address.is_global and not (
        address.is_multicast or address.is_loopback or address.is_link_local or address.is_private
        or address.is_reserved or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def check_url(url: str, *, max_length: int = MAX_URL_LENGTH) -> httpx.URL:
    """``url`` parsed strictly (see the module's docstring); :class:`RefusedURL` says what is wrong with it."""
    if len(url) > max_length:
        raise RefusedURL(f"is longer than {max_length} characters")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url) or "\\" in url:
        raise RefusedURL("must not contain whitespace, control characters, backslashes or non-ASCII characters "
                         "(percent-encode them)")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise RefusedURL("must be an http or https URL")
    if "@" in parts.netloc:
        raise RefusedURL("must not carry a user name or password")
    try:
        port = parts.port
    except ValueError as exc:
        raise RefusedURL("has an invalid port") from exc
    host = check_host(parts.netloc.rsplit(":", 1)[0] if port is not None or parts.netloc.endswith(":") else parts.netloc)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise RefusedURL("is not a valid URL") from exc
    default = 443 if parts.scheme.lower() == "https" else 80
    if parsed.raw_host.decode("ascii").lower() != host.strip("[]") or (parsed.port or default) != (port or default):
        # httpx reads it as we do (its .host decodes punycode: raw_host is the name as written)
        raise RefusedURL("is ambiguous")
    return parsed


def check_host(host: str) -> str:
    """A URL's host as written (lower case): a DNS name, a dotted-quad IPv4 or a bracketed IPv6 address."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        if "%" in host:
            raise RefusedURL("has an IPv6 address with a zone")
        try:
            ipaddress.IPv6Address(host[1:-1])  # a zone (``%eth0``) is refused here too
        except ValueError as exc:
            raise RefusedURL("has an invalid IPv6 address") from exc
        return host
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or len(name) > 253:
        raise RefusedURL("has no valid host")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):  # an IPv4 address: only its canonical dotted-quad form
        try:
            ipaddress.IPv4Address(name)
        except ValueError as exc:
            raise RefusedURL("has an IPv4 address in an unusual form (write it as four decimal numbers)") from exc
        return name
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise RefusedURL("has an invalid host name")
    return host


def _addresses(infos: Iterable[tuple[Any, ...]]) -> list[IPAddress]:
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


def _choose(host: str, addresses: list[IPAddress], policy: Policy, request: httpx.Request | None) -> list[str]:
    """The addresses to connect to, in the resolver's order, provided the policy permits every address the name
    has (a name with one public and one private address is refused, whichever a client would have picked)."""
    if not addresses:
        raise httpx.ConnectError(f"{host} has no address", request=request)
    refused = [a for a in addresses if not policy.permits(host, a)]
    if refused:
        log.warning("refused an outbound request to %s: it resolves to %s", host, refused[0])
        raise AddressNotAllowed(f"{host} resolves to an address this server does not reach", request=request)
    return [str(a) for a in addresses]


def _literal(host: str) -> list[IPAddress] | None:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        return None


def resolve(host: str, port: int, policy: Policy, request: httpx.Request | None = None) -> list[str]:
    """Resolve ``host`` and check every address; the ones to connect to.

    :raises AddressNotAllowed: an address is refused by ``policy``.
    :raises httpx.ConnectError: the name does not resolve."""
    addresses = _literal(host)
    if addresses is None:
        try:
            addresses = _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (socket.gaierror, UnicodeError) as exc:
            raise httpx.ConnectError(f"cannot resolve {host}", request=request) from exc
    return _choose(host, addresses, policy, request)


async def resolve_async(host: str, port: int, policy: Policy, request: httpx.Request | None = None) -> list[str]:
    """:func:`resolve` without blocking the event loop (the lookup runs in the loop's executor)."""
    addresses = _literal(host)
    if addresses is None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpx.ConnectError(f"cannot resolve {host}", request=request) from exc
        addresses = _addresses(infos)
    return _choose(host, addresses, policy, request)


def _pinned(request: httpx.Request, address: str) -> httpx.Request:
    """The same request sent to ``address``: the Host header (set when the request was built) and the TLS server
    name stay the original host's."""
    extensions = dict(request.extensions)
    extensions.setdefault("sni_hostname", request.url.raw_host.decode("ascii"))
    return httpx.Request(request.method, request.url.copy_with(host=address), headers=request.headers,
                         stream=request.stream, extensions=extensions)


def _target(request: httpx.Request) -> tuple[str, int]:
    url = request.url
    return url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80)


# A connection is pinned to the address its host name resolved to, and httpcore pools connections by that
# address: a pooled one could carry another host's request under the first host's TLS name.  So none is kept.
NO_POOL = httpx.Limits(max_keepalive_connections=0)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport, connecting only to addresses ``policy`` permits (checked after DNS, every request)."""

    def __init__(self, policy: Policy, **kwargs: Any) -> None:
        kwargs.setdefault("limits", NO_POOL)
        super().__init__(**kwargs)
        self.policy = policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.policy.unrestricted:
            return super().handle_request(request)
        host, port = _target(request)
        addresses = resolve(host, port, self.policy, request)
        for address in addresses[:-1]:  # the next address when one does not answer, as a client by name would
            try:
                return super().handle_request(_pinned(request, address))
            except httpx.ConnectError:
                continue
        return super().handle_request(_pinned(request, addresses[-1]))


class AsyncGuardedTransport(httpx.AsyncHTTPTransport):
    """:class:`GuardedTransport` for :class:`httpx.AsyncClient`."""

    def __init__(self, policy: Policy, **kwargs: Any) -> None:
        kwargs.setdefault("limits", NO_POOL)
        super().__init__(**kwargs)
        self.policy = policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.policy.unrestricted:
            return await super().handle_async_request(request)
        host, port = _target(request)
        addresses = await resolve_async(host, port, self.policy, request)
        for address in addresses[:-1]:
            try:
                return await super().handle_async_request(_pinned(request, address))
            except httpx.ConnectError:
                continue
        return await super().handle_async_request(_pinned(request, addresses[-1]))


def proxy_mounts(policy: Policy, *, asynchronous: bool = False) -> dict[str, Any]:
    """``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` as Ollama honours them, for a client whose transport is
    guarded (httpx reads these variables only for a client without a transport of its own, so they are read
    here, with httpx's own parser): a URL they send through a proxy goes there, and the proxy resolves and
    connects, so the address check is the proxy's (the caller still checks each URL it asks for); one they
    exempt goes direct through the guard.  For pulls (corral/modelstore/registry.py) and webhooks (jobs/webhooks.py)."""
    from httpx._utils import get_environment_proxies  # private, but the parser a plain httpx client applies

    def proxied(url: str) -> Any:
        return httpx.AsyncHTTPTransport(proxy=url) if asynchronous else httpx.HTTPTransport(proxy=url)

    def direct() -> Any:
        return AsyncGuardedTransport(policy) if asynchronous else GuardedTransport(policy)

    return {pattern: proxied(url) if url else direct() for pattern, url in get_environment_proxies().items()}
