"""A small HTTP client for a corral server, used by the CLI.

The CLI never touches the database or Redis: like the ``ollama`` CLI it talks HTTP, so it works the same against
``corral up`` on a laptop and against a GPU box across the room.  Every failure becomes a :class:`ClientError`
with one readable line (the server's ``{"error": ...}`` text when it sent one), which the CLI prints without a
traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from corral import __version__

UPLOAD_CHUNK = 1 << 20


class ClientError(Exception):
    """A request that did not succeed, with the message to show and the HTTP status (0: no response)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error_text(response: httpx.Response) -> str:
    try:
        body = json.loads(response.read() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI shape
            error = error.get("message")
        if error:
            return str(error)
    text = response.text.strip()
    return text[:300] if text else f"HTTP {response.status_code}"


class CorralClient:
    """Blocking client for the Ollama-shaped and job routes of one server."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float | None = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": f"corral-cli/{__version__}", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Streams can sit idle while a model loads or a job queues: only the connect phase has a short limit.
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CorralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError as exc:
            raise ClientError(
                f"could not connect to a corral server at {self.base_url} (is it running? start one with `corral up`, "
                "or point --host / CORRAL_HOST at it)"
            ) from exc
        except httpx.TimeoutException as exc:
            raise ClientError(f"the server at {self.base_url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise ClientError(f"request to {self.base_url} failed: {exc}") from exc

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return the decoded JSON body (None when it is empty)."""
        with self._guard():
            response = self._http.request(method, path, **kwargs)
            if response.status_code >= 400:
                raise ClientError(_error_text(response), response.status_code)
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError as exc:
                raise ClientError(f"the server at {self.base_url} sent a reply that is not JSON") from exc

    def head(self, path: str) -> int:
        """The status of a HEAD request (200 or 404 for a blob)."""
        with self._guard():
            return int(self._http.head(path).status_code)

    def stream_lines(self, method: str, path: str, *, read_timeout: float | None = None, **kwargs: Any) -> Iterator[bytes]:
        """Yield the raw NDJSON lines of a streaming response; an ``{"error"}`` line is left to the caller."""
        with self._guard():
            timeout = httpx.Timeout(read_timeout, connect=10.0)
            with self._http.stream(method, path, timeout=timeout, **kwargs) as response:
                if response.status_code >= 400:
                    raise ClientError(_error_text(response), response.status_code)
                for line in response.iter_lines():
                    if line:
                        yield line.encode()

    def stream_json(self, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Decoded NDJSON objects; a line carrying ``error`` raises :class:`ClientError`."""
        for line in self.stream_lines(method, path, **kwargs):
            obj = json.loads(line)
            if isinstance(obj, dict) and obj.get("error"):
                raise ClientError(str(obj["error"]))
            yield obj

    # -- jobs -------------------------------------------------------------------------------------------

    def submit_stream(self, body: Iterable[bytes], *, content_type: str, params: dict[str, Any]) -> dict[str, Any]:
        """Upload a job body chunk by chunk (chunked transfer), so its size never matters to memory."""
        query = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in params.items() if v is not None}
        return self.request(  # type: ignore[no-any-return]
            "POST", "/api/jobs", params=query, content=body, headers={"Content-Type": content_type},
            timeout=httpx.Timeout(None, connect=10.0),
        )

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(self, status: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self.request("GET", "/api/jobs", params=params)  # type: ignore[no-any-return]

    def results(self, job_id: str, state: str | None = None, include_input: bool = False) -> Iterator[bytes]:
        params: dict[str, str] = {"state": state} if state else {}
        if include_input:
            params["include_input"] = "true"
        return self.stream_lines("GET", f"/api/jobs/{job_id}/results", params=params)


def file_chunks(handle: Any, size: int = UPLOAD_CHUNK) -> Iterator[bytes]:
    """Read a binary file object in fixed-size pieces (the upload body generator)."""
    while True:
        piece = handle.read(size)
        if not piece:
            return
        yield piece
