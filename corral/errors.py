"""The typed errors every process raises; each class carries its HTTP status.

::

    CorralError (500)
    ├── BadRequest (400)
    │   └── ContextLengthExceeded (400)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    ├── NotFound (404)
    │   └── ModelNotFound (404)
    │       └── IncompleteModel (404)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── UnsupportedEncoding (415)
    ├── RateLimited (429)
    ├── RequestCanceled (499)
    ├── GenerationFailed (500)
    ├── QueueFull (503)
    ├── WorkerUnavailable (503)
    │   └── BrokerUnavailable (503)
    └── DatabaseUnavailable (503)

Views and workers raise these; one handler per wire format (Ollama ``{"error": msg}``, OpenAI
``{"error": {...}}``) renders them.  A worker sends an error over the token stream as (status, message, code)
and the API turns it back into the same class with :func:`error_for_status`.
"""

from __future__ import annotations

from typing import ClassVar


class CorralError(Exception):
    """Base class: an error with a message meant for the client."""

    status_code: ClassVar[int] = 500
    openai_type: ClassVar[str] = "api_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(CorralError):
    """The request is malformed or asks for something the model cannot do."""

    status_code = 400
    openai_type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    """An input does not fit the model's context and the client asked not to truncate."""

    code = "context_length_exceeded"


class Unauthorized(CorralError):
    """API keys are required and the request has none, or an unknown or revoked one."""

    status_code = 401
    openai_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(CorralError):
    """The key is valid but may not do this (changing the models everyone shares needs an admin key)."""

    status_code = 403
    openai_type = "permission_error"
    code = "insufficient_permissions"


class NotFound(CorralError):
    """A job, file or other resource does not exist (or belongs to someone else)."""

    status_code = 404
    openai_type = "not_found_error"


class ModelNotFound(NotFound):
    """The model is not in the store."""


class IncompleteModel(ModelNotFound):
    """The model's manifest names a blob the store does not have: a 404 that says so (routes keep its words)."""


class Conflict(CorralError):
    """The resource is in a state that does not allow the operation (e.g. retrying a running job)."""

    status_code = 409
    openai_type = "invalid_request_error"


class PayloadTooLarge(CorralError):
    """The request body is over the configured limit."""

    status_code = 413
    openai_type = "invalid_request_error"


class UnsupportedEncoding(CorralError):
    """A request body in a ``Content-Encoding`` corral cannot decode."""

    status_code = 415
    openai_type = "invalid_request_error"


class RequestCanceled(CorralError):
    """The client went away before its request was scheduled (Ollama's 499)."""

    status_code = 499


class RateLimited(CorralError):
    """A key's limit is spent (requests or tokens per minute, open requests, queued items, its token budget):
    a 429 with ``Retry-After``, which the openai client honours by itself."""

    status_code = 429
    openai_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = max(1, int(retry_after + 0.999))


class GenerationFailed(CorralError):
    """The engine failed while running a request; the message says why."""


class QueueFull(CorralError):
    """More interactive requests are waiting for a model than ``OLLAMA_MAX_QUEUE`` allows."""

    status_code = 503

    def __init__(self, message: str = "server busy, please try again.  maximum pending requests exceeded") -> None:
        super().__init__(message)


class WorkerUnavailable(CorralError):
    """No worker picked the request up in time, or the worker running it died."""

    status_code = 503


class BrokerUnavailable(WorkerUnavailable):
    """Redis (the broker and the token streams) does not answer: a 503 with ``Retry-After``, so a client tries
    again once it is back rather than taking the outage for a failed request."""

    def __init__(self, cause: BaseException | str, *, retry_after: float = 5.0) -> None:
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"the broker (Redis) is unreachable ({detail}); try again shortly")
        self.retry_after = max(1, int(retry_after + 0.999))


class DatabaseUnavailable(CorralError):
    """The job database (PostgreSQL) does not answer, or dropped the session: restarting, in recovery, out of
    reach.  A 503 with ``Retry-After``, not a 500: SQL holds the truth, nothing was lost, and the same request
    succeeds once the database is back (a job submission whose commit outcome is unknown may exist by then:
    ``GET /api/jobs`` tells)."""

    status_code = 503
    code = "database_unavailable"

    def __init__(self, cause: BaseException | str, *, retry_after: float = 5.0) -> None:
        detail = cause if isinstance(cause, str) else type(cause).__name__
        super().__init__(f"the job database is unreachable ({detail}); try again shortly")
        self.retry_after = max(1, int(retry_after + 0.999))


_BY_STATUS: dict[int, type[CorralError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    499: RequestCanceled,
    500: GenerationFailed,
    503: WorkerUnavailable,
}


# Errors a worker raises whose machine-readable code clients act on (Codex compacts its history on
# ``context_length_exceeded``): the code crosses the process boundary with the status.
_BY_CODE: dict[str, type[CorralError]] = {ContextLengthExceeded.code: ContextLengthExceeded}


def error_for_status(status: int, message: str, code: str | None = None) -> CorralError:
    """Rebuild an error that crossed a process boundary as (status, message, its code if it had one)."""
    by_code = _BY_CODE.get(code or "")
    if by_code is not None and by_code.status_code == status:
        return by_code(message)
    return _BY_STATUS.get(status, CorralError)(message)
