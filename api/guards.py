"""CORS and the Host-header check, as Ollama's gin middleware does them.

CORS: allowed origins are Ollama's defaults plus ``OLLAMA_ORIGINS`` (``*`` wildcards; ``*`` alone allows all).
A disallowed Origin gets an empty 403; a preflight an empty 204.  An Origin equal to the request's own
``scheme://host`` is not a cross-origin request.
Host check (DNS-rebinding guard): only when the server listens on loopback; then the Host header must name this
machine (localhost, the hostname, ``*.localhost``/``*.local``/``*.internal``, or a loopback/private IP).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache

from flask import Flask, Response, request

from corral.settings import Settings

DEFAULT_ORIGINS = [
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https")
    for port in ("", ":*")
] + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]

ALLOW_HEADERS = ", ".join(
    ["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta"]
    + [
        f"x-stainless-{h}"
        for h in (
            "arch", "async", "custom-poll-interval", "helper-method", "lang", "os", "package-version",
            "poll-helper", "retry-count", "runtime", "runtime-version", "timeout",
        )
    ]
)
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


@lru_cache(maxsize=64)
def _pattern(origin: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in origin.split("*")) + "$", re.IGNORECASE)


def origin_allowed(origin: str, extra: list[str]) -> bool:
    if "*" in extra:
        return True
    return any(_pattern(p).match(origin) for p in DEFAULT_ORIGINS + extra)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str) -> bool:
    host = host_header.strip()
    if not host:
        return True
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    if host in ("localhost", socket.gethostname().lower()) or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def init_app(app: Flask, settings: Settings) -> None:
    """Install the guards on ``app``."""
    extra = settings.origins
    check_host = _is_loopback(settings.bind[0])

    @app.before_request
    def _guard() -> Response | None:
        if check_host and not host_allowed(request.host):
            return Response(status=403)
        origin = request.headers.get("Origin")
        if not origin or origin.lower() in (f"http://{request.host}", f"https://{request.host}"):
            return None
        if not origin_allowed(origin, extra):
            return Response(status=403)
        if request.method == "OPTIONS":
            resp = Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            resp.headers["Access-Control-Max-Age"] = "43200"
            return resp
        return None

    @app.after_request
    def _cors(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and origin_allowed(origin, extra):
            resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in extra else origin
            resp.headers.add("Vary", "Origin")
        return resp
