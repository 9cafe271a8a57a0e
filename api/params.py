"""Query parameters of the corral-native routes (``/api/jobs``, ``/v1/files``, ``/v1/batches``), read with the
same 400s everywhere: a parameter that does not parse names itself."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from corral.errors import BadRequest
from corral.wire.ollama import parse_json


def query_int(name: str, default: int | None) -> int | None:
    """An integer query parameter (absent or empty: ``default``); anything else is a 400 naming it."""
    value = request.args.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise BadRequest(f"{name} must be an integer", param=name) from exc


def query_json(name: str) -> Any:
    """A query parameter holding JSON (``options``, ``metadata`` of a JSONL upload); absent or empty: None."""
    value = request.args.get(name)
    if not value:
        return None
    try:
        return parse_json(value)
    except (json.JSONDecodeError, UnicodeError) as exc:
        raise BadRequest(f"{name} must be JSON") from exc
    except BadRequest as exc:
        raise BadRequest(f"{name}: {exc.message}", param=name) from exc


def query_flag(name: str) -> bool:
    """A boolean query parameter: ``true``/``1``/``yes`` or ``false``/``0``/``no`` (absent or empty: false)."""
    value = (request.args.get(name) or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise BadRequest(f"{name} must be true or false", param=name)
