"""Serve the API with gunicorn (threaded workers: each open token stream holds a thread, not a process)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from corral.settings import Settings


class _Server(BaseApplication):  # type: ignore[misc]
    """gunicorn's documented "custom application" pattern; the Flask app is built in the worker process."""

    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from api import create_app

        return create_app(self.settings)


def serve(settings: Settings, *, access_log: bool = True) -> None:
    """Run the API in the foreground on ``settings.bind`` until SIGINT/SIGTERM."""
    host, port = settings.bind
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = {
        "bind": bind,
        "workers": 1,
        "worker_class": "gthread",
        "threads": settings.api_threads,
        "timeout": 120,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "corral-api",
    }
    _Server(settings, options).run()
