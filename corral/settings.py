"""The one place that reads the environment.

Every process (API, worker, CLI, launcher) builds a :class:`Settings` and passes it down explicitly.  Where
Ollama defines a variable we use its exact name and meaning (``OLLAMA_HOST``, ``OLLAMA_MODELS``,
``OLLAMA_KEEP_ALIVE``, ``OLLAMA_NUM_PARALLEL``, ``OLLAMA_MAX_QUEUE``, ``OLLAMA_ORIGINS``, ...); everything
corral-specific is ``CORRAL_*``, plus the conventional ``DATABASE_URL`` and ``REDIS_URL``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_PORT = 11434
FOREVER = math.inf

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string ("5m", "1h30m", "-1m", "0") into seconds, as Ollama does.

    :raises ValueError: with Go's own message, which Ollama returns to the client verbatim.
    """
    s = text.strip()
    sign = 1.0
    body = s
    if body[:1] in ("+", "-"):  # not `in "+-"`: the empty string is in every string
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0.0, 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if not m:
            if re.fullmatch(r"[\d.]+", body[pos:]):
                raise ValueError(f'time: missing unit in duration "{text}"')
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_keep_alive(value: Any) -> float:
    """Turn an Ollama ``keep_alive`` (seconds as a number, or a duration string) into seconds.

    Negative means "forever" (returned as ``math.inf``).  Integer strings are seconds, as in
    ``OLLAMA_KEEP_ALIVE`` (the request field requires a unit, which :func:`parse_request_keep_alive` enforces).
    """
    if isinstance(value, bool):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = parse_go_duration(value)
    else:
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    return FOREVER if seconds < 0 else seconds


def parse_request_keep_alive(value: Any) -> float:
    """Parse the request body's ``keep_alive``: numbers are seconds, strings must be Go durations."""
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return FOREVER if seconds < 0 else seconds
    return parse_keep_alive(value)


def parse_ollama_host(value: str) -> tuple[str, str, int]:
    """Split ``OLLAMA_HOST`` into (scheme, host, port) with Ollama's rules.

    ``[scheme://]host[:port][/path]``; no port means 11434, except that ``http://x`` means 80 and
    ``https://x`` 443.  An empty host means 127.0.0.1.
    """
    raw = (value or "").strip().strip("\"'")
    scheme, had_scheme = "http", False
    if "://" in raw:
        scheme, raw = raw.split("://", 1)
        had_scheme = True
    parts = urlsplit(f"//{raw}")
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = (443 if scheme == "https" else 80) if had_scheme else DEFAULT_PORT
    return scheme, host, port


def client_url(value: str) -> str:
    """``OLLAMA_HOST``-style address -> base URL for a client (an unspecified bind address means this machine)."""
    scheme, host, port = parse_ollama_host(value)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


# What CPU workers decode chat models with (workers/weights.py explains the choice).
CpuWeights = Literal["auto", "native", "q8_0", "bf16"]


class Settings(BaseSettings):
    """Configuration shared by the API, the workers, the launcher and the CLI."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".corral",
        validation_alias=AliasChoices("CORRAL_HOME", "home"),
        description="State directory: SQLite database, private Redis data, default model store.",
    )
    host: str = Field(
        "127.0.0.1:11434",
        validation_alias=AliasChoices("OLLAMA_HOST", "host"),
        description="Bind address of the API, `[scheme://]host[:port]` as in Ollama.",
    )
    models_dir: Path | None = Field(
        None,
        validation_alias=AliasChoices("OLLAMA_MODELS", "models_dir"),
        description="Model store (blobs + manifests); default `$CORRAL_HOME/models`.",
    )
    keep_alive: float = Field(
        300.0,
        validation_alias=AliasChoices("OLLAMA_KEEP_ALIVE", "keep_alive"),
        description="How long a model stays loaded after a request (default 5m): a Go duration (`5m`, `1h30m`) or "
        "seconds, negative = forever.",
    )
    num_parallel: int = Field(
        0,
        ge=0,
        le=256,
        validation_alias=AliasChoices("OLLAMA_NUM_PARALLEL", "num_parallel"),
        description=(
            "Sequences one loaded chat model decodes together (continuous batching slots); each gets num_ctx "
            "tokens of KV cache. 0 = auto: 8, fewer when their KV cache would pass 2 GiB."
        ),
    )
    max_queue: int = Field(
        512,
        ge=1,
        validation_alias=AliasChoices("OLLAMA_MAX_QUEUE", "max_queue"),
        description="Interactive requests that may wait per model before the API answers 503.",
    )
    origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("OLLAMA_ORIGINS", "origins"),
        description="Extra CORS origins (comma-separated, `*` wildcards; `*` alone allows all), added to Ollama's defaults.",
    )
    max_loaded_models: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("OLLAMA_MAX_LOADED_MODELS", "max_loaded_models"),
        description="Models a worker keeps loaded at once; 0 = 3.",
    )
    context_length: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("OLLAMA_CONTEXT_LENGTH", "context_length"),
        description="Default `num_ctx`; 0 = 4096 (capped at the model's training context).",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis for the Celery broker, token streams and rate limits; `corral up` starts a private one "
        "if unset. One server: `redis://[[user]:password@]host:port/db` (also `rediss://`, `unix://`). A primary "
        "that Redis Sentinel fails over: `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]"
        "/<master name>[/<db>]`, listing Sentinels (port 26379 by default) and the name they monitor; the "
        "password is the primary's, `?sentinel_password=...` the Sentinels' own, if any.",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="SQLAlchemy URL of the job database; default SQLite under `$CORRAL_HOME`.",
    )
    queue_timeout: float = Field(
        600.0,
        gt=0,
        validation_alias=AliasChoices("CORRAL_QUEUE_TIMEOUT", "queue_timeout"),
        description="Seconds an interactive request may wait for a worker before it fails with a 503.",
    )
    heartbeat_ttl: float = Field(
        15.0,
        gt=0,
        validation_alias=AliasChoices("CORRAL_HEARTBEAT_TTL", "heartbeat_ttl"),
        description=("A worker silent this long is dead: its streams end with an error, its chunks are re-run. An API "
                     "process that stops reading a reply this long is dead too: the worker stops that generation."),
    )
    stream_ttl: int = Field(
        300,
        gt=0,
        validation_alias=AliasChoices("CORRAL_STREAM_TTL", "stream_ttl"),
        description="Seconds a finished token stream stays replayable in Redis.",
    )
    api_threads: int = Field(
        64,
        ge=1,
        validation_alias=AliasChoices("CORRAL_API_THREADS", "api_threads"),
        description="Request threads of the API server (each open stream holds one).",
    )
    worker_threads: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("CORRAL_WORKER_THREADS", "worker_threads"),
        description="CPU threads llama.cpp uses per model; 0 = all cores.",
    )
    cpu_weights: CpuWeights = Field(
        "auto",
        validation_alias=AliasChoices("CORRAL_CPU_WEIGHTS", "cpu_weights"),
        description=(
            "Weights a CPU worker decodes with: `auto` = a Q8_0 copy (made once under the model store) of "
            "Q4_1/Q5_1 chat models when it runs several slots, where llama.cpp batches Q8_0 faster, and a BF16 "
            "copy of F16 embedding models where the worker's llama.cpp has AVX512-BF16 kernels (an embedding-only "
            "worker on such a CPU: 1.4x F16's speed on AMD Zen 4, minimum cosine to sentence-transformers "
            "1.0000), or a Q8_0 copy of them where it has AMX kernels (an embedding-only worker on an Intel CPU "
            "with AMX: 1.3-1.4x F16's speed on that build, minimum cosine 0.9988); `native` = always the model's own; `q8_0` = a "
            "Q8_0 copy of every model quantized below 8 bits and of F16 embedding models (minimum cosine 0.9990, "
            "slower than F16 without AMX); `bf16` = a BF16 copy of every F16 or F32 model."
        ),
    )
    chunk_size: int = Field(
        16,
        ge=1,
        le=10_000,
        validation_alias=AliasChoices("CORRAL_CHUNK_SIZE", "chunk_size"),
        description="Batch-job items per Celery chunk task (keep one chunk to seconds).",
    )
    prefix_grouping: bool = Field(
        True,
        validation_alias=AliasChoices("CORRAL_PREFIX_GROUPING", "prefix_grouping"),
        description="Chunk a job's prompts sorted by text and let a decode slot prefill a shared prefix before "
        "the other prompts that share it copy it (`0`: input order, as a baseline for bench/prefix_batch.py).",
    )
    visibility_timeout: int = Field(
        6 * 3600,
        ge=60,
        validation_alias=AliasChoices("CORRAL_VISIBILITY_TIMEOUT", "visibility_timeout"),
        description="Redis broker redelivery timeout; far above a chunk's duration.",
    )
    reconcile_interval: float = Field(
        10.0,
        gt=0,
        validation_alias=AliasChoices("CORRAL_RECONCILE_INTERVAL", "reconcile_interval"),
        description="Seconds between a worker's sweeps for batch items lost to dead workers or a flushed Redis.",
    )
    upload_limit: int = Field(
        1 << 30,
        gt=0,
        validation_alias=AliasChoices("CORRAL_UPLOAD_LIMIT", "upload_limit"),
        description="Largest job upload or OpenAI file, in bytes (streamed to the database; default 1 GiB).",
    )
    max_body: int = Field(
        32 << 20,
        gt=0,
        validation_alias=AliasChoices("CORRAL_MAX_BODY", "max_body"),
        description="Largest request body on the sync routes, in bytes (default 32 MiB); uploads use CORRAL_UPLOAD_LIMIT.",
    )
    max_predict: int = Field(
        0,
        ge=0,
        validation_alias=AliasChoices("CORRAL_MAX_PREDICT", "max_predict"),
        description="Most tokens one sync request may generate (a larger or unlimited num_predict is lowered to it); "
        "0: no cap beyond the context, as in Ollama.",
    )
    pull_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        validation_alias=AliasChoices("CORRAL_PULL_HOSTS", "pull_hosts"),
        description="Registry hosts `pull` may fetch from (comma-separated, `*` wildcards; e.g. "
        "`registry.ollama.ai,*.r2.cloudflarestorage.com,hf.co,*.hf.co`: each registry with its blob store); the "
        "packaged default models need none.  Another host is a 403, and a redirect to one fails the pull (list the "
        "registry's blob store too); a host matched only by a wildcard "
        "must resolve to public addresses, one named exactly may be private.  `HTTPS_PROXY`, `HTTP_PROXY` and "
        "`NO_PROXY` apply to pulls as in Ollama (a proxied request's address is the proxy's to check).",
    )
    require_api_key: bool = Field(
        False,
        validation_alias=AliasChoices("CORRAL_REQUIRE_API_KEY", "require_api_key"),
        description="Require `Authorization: Bearer <key>` on every route but `/` (keys from `corral keys create`).",
    )
    key_limits: str = Field(
        "",
        validation_alias=AliasChoices("CORRAL_KEY_LIMITS", "key_limits"),
        description='Limits for keys without their own, as JSON: `{"rpm": 60, "tpm": 100000, "max_concurrent": 4, '
        '"max_queued_items": 100000, "token_budget": 5000000, "budget_period": "1d", "models": ["llama3*"]}`.',
    )
    webhook_url: str | None = Field(
        None,
        validation_alias=AliasChoices("CORRAL_WEBHOOK_URL", "webhook_url"),
        description="Where the end of every job without its own `webhook_url` is announced (signed POST).",
    )
    webhook_secret: str | None = Field(
        None,
        validation_alias=AliasChoices("CORRAL_WEBHOOK_SECRET", "webhook_secret"),
        description="`whsec_...` secret that signs deliveries to CORRAL_WEBHOOK_URL (Standard Webhooks).",
    )
    webhook_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("CORRAL_WEBHOOK_ALLOW_NETWORKS", "webhook_allow_networks"),
        description="Networks webhooks may reach besides the public internet (comma-separated CIDRs, e.g. "
        "`127.0.0.0/8,10.1.0.0/16` for a receiver on this host or network); loopback, link-local, private, "
        "multicast, unspecified and reserved addresses are refused otherwise, at submission and again at connect "
        "time.",
    )
    result_cache_ttl: int = Field(
        7 * 24 * 3600,
        ge=0,
        validation_alias=AliasChoices("CORRAL_RESULT_CACHE_TTL", "result_cache_ttl"),
        description="Seconds a deterministic request's result serves jobs submitted with `cache: true`; 0: off.",
    )
    responses_ttl: int = Field(
        30 * 24 * 3600,
        gt=0,
        validation_alias=AliasChoices("CORRAL_RESPONSES_TTL", "responses_ttl"),
        description="Seconds a stored `/v1/responses` response (`store: true`) is kept for retrieval and "
        "`previous_response_id` (default 30 days).",
    )
    result_cache_shared: bool = Field(
        False,
        validation_alias=AliasChoices("CORRAL_RESULT_CACHE_SHARED", "result_cache_shared"),
        description="`1`: every API key's `cache: true` jobs share one result cache (a hit tells a key that another "
        "ran that prompt, and when); `0`: each key has its own.  Set it alike for the API and the workers.",
    )
    dry_run_max_lines: int = Field(
        50_000,
        ge=1,
        validation_alias=AliasChoices("CORRAL_DRY_RUN_MAX_LINES", "dry_run_max_lines"),
        description="Most lines one dry run reads (413 past it): a sample this large estimates a larger job.",
    )
    dry_run_max_tokens: int = Field(
        5_000_000,
        ge=1,
        validation_alias=AliasChoices("CORRAL_DRY_RUN_MAX_TOKENS", "dry_run_max_tokens"),
        description="Most prompt tokens a worker counts for one dry run (413 past it; ~15 s of a worker's time).",
    )
    read_only: bool = Field(
        False,
        validation_alias=AliasChoices("CORRAL_READ_ONLY", "read_only"),
        description="`1`: refuse model create, pull, copy, delete and blob uploads (403); inference and jobs go on.",
    )

    client_host: str | None = Field(
        None,
        validation_alias=AliasChoices("CORRAL_HOST", "client_host"),
        description="Server the CLI talks to, `[scheme://]host[:port]`; default `OLLAMA_HOST`, else 127.0.0.1:11434.",
    )
    api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("CORRAL_API_KEY", "api_key"),
        description="API key the CLI sends as `Authorization: Bearer`.",
    )

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float:
        return parse_keep_alive(value)

    @field_validator("origins", "pull_hosts", "webhook_allow_networks", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return list(value or [])

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """A REDIS_URL corral cannot use fails at start-up with the form it expects, not at the first request."""
        if not value:
            return value
        from corral.redis_connection import check_redis_url  # lazily: it imports redis-py

        return check_redis_url(value)

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # a ValueError names the bad one
        return value

    def environment(self) -> dict[str, str]:
        """The environment variables (each field's first alias) that make another process build these same
        settings: what ``corral up`` hands its API and worker, and the tests their stacks.  Unset fields
        (None) are left out, so the child's defaults apply to them too."""
        env: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            alias = field.validation_alias
            if value is None or not isinstance(alias, AliasChoices):
                continue
            if isinstance(value, bool):
                text = "1" if value else "0"
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value)
            elif isinstance(value, float) and math.isinf(value):
                text = "-1"  # keep_alive: forever
            else:
                text = str(value)
            env[str(alias.choices[0])] = text
        return env

    # -- derived values ---------------------------------------------------------------------------------

    @property
    def bind(self) -> tuple[str, int]:
        """(host, port) the API listens on."""
        _, host, port = parse_ollama_host(self.host)
        return host, port

    @property
    def server_url(self) -> str:
        """Base URL the CLI connects to: `CORRAL_HOST`, else `OLLAMA_HOST`, with Ollama's parsing rules."""
        return client_url(self.client_host or self.host)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir) if self.models_dir else self.home / "models"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'corral.db'}"

    @property
    def redis(self) -> str:
        if not self.redis_url:
            raise RuntimeError("REDIS_URL is not set (corral up sets it after starting a private Redis)")
        return self.redis_url

    @property
    def loaded_model_limit(self) -> int:
        return self.max_loaded_models or 3

    @property
    def default_num_ctx(self) -> int:
        return self.context_length or 4096
