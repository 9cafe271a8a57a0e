"""What every ``corral`` command shares: the settings context object and the HTTP client options.

Client commands take ``--host`` (else ``CORRAL_HOST``, else ``OLLAMA_HOST``, parsed with Ollama's rules) and
``--api-key`` (else ``CORRAL_API_KEY``).  Errors from the server or the network become one line on stderr
through :class:`click.ClickException`, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from cli.client import ClientError, CorralClient
from corral.settings import Settings, client_url

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """The CLI's context object: settings, built once from the environment."""

    def __init__(self) -> None:
        try:
            self.settings = Settings()
        except ValidationError as exc:
            first = exc.errors()[0]
            raise click.ClickException(f"bad setting {first['loc'][0]}: {first['msg']}") from exc

    def with_bind(self, host: str | None, port: int | None) -> Settings:
        """Settings with ``--host``/``--port`` applied over ``OLLAMA_HOST``."""
        if host is None and port is None:
            return self.settings
        current_host, current_port = self.settings.bind
        return self.settings.model_copy(update={"host": f"{host or current_host}:{port or current_port}"})

    def client(self, host: str | None, api_key: str | None, timeout: float | None = 30.0) -> CorralClient:
        url = client_url(host) if host else self.settings.server_url
        return CorralClient(url, api_key=api_key or self.settings.api_key, timeout=timeout)


pass_ctx = click.make_pass_decorator(Context, ensure=True)


def client_options(func: F) -> F:
    """Add ``--host`` and ``--api-key`` to a command that talks to a server."""
    func = click.option(
        "--api-key", envvar="CORRAL_API_KEY", metavar="KEY", help="API key sent as a Bearer token [env: CORRAL_API_KEY]."
    )(func)
    func = click.option(
        "--host", "server", metavar="URL",
        help="Server address, [scheme://]host[:port] [env: CORRAL_HOST, else OLLAMA_HOST; default 127.0.0.1:11434].",
    )(func)
    return func


@contextmanager
def reporting() -> Iterator[None]:
    """Turn client errors into ``click.ClickException`` (one line, exit code 1)."""
    try:
        yield
    except ClientError as exc:
        raise click.ClickException(exc.message) from exc


def with_client(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: pass a connected client (built from --host/--api-key) as ``client`` and report its errors."""

    def wrapper(ctx: Context, /, server: str | None, api_key: str | None, **kwargs: Any) -> Any:
        with reporting(), ctx.client(server, api_key) as client:
            return func(client, **kwargs)

    functools.update_wrapper(wrapper, func)  # click reads the command's name and help from it
    return client_options(pass_ctx(wrapper))


def parse_pairs(pairs: tuple[str, ...], what: str = "option") -> dict[str, Any]:
    """``k=v`` strings -> dict; values are JSON when they parse (numbers, booleans, lists), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.ClickException(f"bad {what} {pair!r}: expected KEY=VALUE, e.g. temperature=0")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def human_size(n: int | float) -> str:
    """Ollama's sizes: decimal units, e.g. ``105 MB``, ``1.3 GB``."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB", "MB") or value >= 10 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def columns(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by three spaces, like Ollama's tabwriter output."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
