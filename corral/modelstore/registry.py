"""``pull`` over the network: Ollama's registry protocol (``registry.ollama.ai``, any other registry host, and
``hf.co/{user}/{repo}[:{quant}]``, which Hugging Face serves the same way).

A name ``[host/][namespace/]model[:tag]`` is fetched as Ollama fetches it: the manifest from
``{scheme}://{host}/v2/{namespace}/{model}/manifests/{tag}``, then each blob by digest from ``.../blobs/{digest}``,
``https`` unless the request says ``insecure``.  A registry redirects blob downloads to its blob store; corral
follows redirects itself (at most :data:`MAX_REDIRECTS`, never from https to http), each hop to a host
``CORRAL_PULL_HOSTS`` allows, and every connection goes through :mod:`corral.outbound`'s guard: a host reached
only through a wildcard pattern (the default ``*``) must resolve to public addresses, while one the list names
exactly (``127.0.0.1:*``, ``registry.internal:5000``) may be anywhere.  Otherwise an allowed registry could send
the server to its own Redis or to a cloud metadata service.  For the same reason an upstream error is reported
by its status code alone, never its body.  A blob downloads into
``blobs/sha256-<hex>-partial``, resumed with an HTTP ``Range`` after an interruption, and becomes visible only once
its sha256 matches.  The manifest is written last, under the store's lock, so an interrupted pull leaves no model
registered, and a delete cannot sweep the blobs of a pull in progress.  The two default models stay in the
packaged catalog (:mod:`corral.modelstore.catalog`), which needs no network.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corral import outbound
from corral.errors import Forbidden
from corral.modelstore.catalog import PULL_NOT_FOUND, PullError
from corral.modelstore.gguf_meta import gguf_config
from corral.modelstore.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MODEL_MEDIA_TYPE, ModelName, ModelStore

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 0.1  # at most one progress line per layer this often (Ollama: about every 60 ms)
CHUNK = 1 << 20
MAX_REDIRECTS = 10  # as Ollama
MAX_URL_LENGTH = 16_000  # a blob store's signed URL is long
_PORT = re.compile(r"(.*):(\d+|\*)")


def manifest_url(name: ModelName, *, insecure: bool) -> str:
    return f"{'http' if insecure else 'https'}://{name.host}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"


def blob_url(name: ModelName, digest: str, *, insecure: bool) -> str:
    return f"{'http' if insecure else 'https'}://{name.host}/v2/{name.namespace}/{name.model}/blobs/{digest}"


def pull(
    store: ModelStore, text: str, *, insecure: bool = False, hosts: list[str] | None = None,
    client: httpx.Client | None = None,
) -> Iterator[dict[str, Any]]:
    """Fetch ``text`` into ``store``, yielding Ollama's progress objects; raise :class:`PullError` on failure.
    ``hosts`` (``CORRAL_PULL_HOSTS``) are the registry hosts allowed, as glob patterns; a name elsewhere is a
    403 before anything is sent."""
    name = ModelName.parse(text)
    if hosts is not None and not allowed_host(name.host, hosts):
        raise Forbidden(f"pulling from {name.host} is not allowed on this server (CORRAL_PULL_HOSTS)")
    policy = outbound.UNRESTRICTED if hosts is None else outbound.Policy.allowing(trusted_hosts=named_hosts(hosts))
    http = client or httpx.Client(transport=outbound.GuardedTransport(policy), mounts=outbound.proxy_mounts(policy),
                                  follow_redirects=False, timeout=httpx.Timeout(60.0, connect=15.0),
                                  headers={"User-Agent": "corral (ollama-compatible)"})
    try:
        yield {"status": "pulling manifest"}
        manifest = _manifest(http, name, insecure=insecure, hosts=hosts)
        refs = [manifest["config"], *manifest["layers"]]
        with store.writing():
            for ref in refs:
                yield from _blob(http, store, name, ref, insecure=insecure, hosts=hosts)
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            store.write_manifest(text, _with_corral_config(store, manifest))
        yield {"status": "success"}
    except httpx.HTTPError as exc:
        log.warning("pull of %s failed: %s: %s", text, type(exc).__name__, exc)
        raise PullError(f"pull failed: {_reason(exc)}") from exc
    except OSError as exc:  # the disk filled, say: the partial file stays for the next try
        raise PullError(f"pull failed: {exc.strerror or exc}") from exc
    finally:
        if client is None:
            http.close()


def allowed_host(host: str, hosts: list[str]) -> bool:
    """Whether ``host`` (``name[:port]``) matches a ``CORRAL_PULL_HOSTS`` pattern."""
    return any(fnmatch.fnmatchcase(host.lower(), pattern.lower()) for pattern in hosts)


def named_hosts(hosts: list[str]) -> list[str]:
    """The host names ``CORRAL_PULL_HOSTS`` spells out (no wildcard before the port): an administrator chose
    them, so they may resolve to private addresses (a registry on the local network)."""
    named = []
    for pattern in hosts:
        match = _PORT.fullmatch(pattern)
        host = (match.group(1) if match else pattern).strip("[]").lower()
        if host and not any(c in host for c in "*?["):
            named.append(host)
    return named


def _reason(exc: httpx.HTTPError) -> str:
    """A failed request in words of our own: an exception's text can quote what answered (a protocol error
    shows the bytes that were not HTTP)."""
    if isinstance(exc, outbound.AddressNotAllowed):
        return f"{exc} (CORRAL_PULL_HOSTS may name it to allow it)"
    if isinstance(exc, httpx.TimeoutException):
        return "the registry did not answer in time"
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect to the registry"
    return type(exc).__name__


def _get(http: httpx.Client, url: str, *, hosts: list[str] | None, what: str,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """GET ``url`` and follow its redirects (each hop checked by :func:`_next_hop`); the final answer, whose body
    is not read yet (the caller closes it)."""
    target = httpx.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        reply = http.send(http.build_request("GET", target, headers=headers), stream=True, follow_redirects=False)
        if not reply.has_redirect_location:
            return reply
        reply.close()
        target = _next_hop(target, reply.headers["location"], hosts, what)
    raise PullError(f"{what}: more than {MAX_REDIRECTS} redirects")


def _next_hop(current: httpx.URL, location: str, hosts: list[str] | None, what: str) -> httpx.URL:
    """Where a redirect points, if the pull may go there: a strictly parsed http(s) URL, not from https down to
    http, on a host ``CORRAL_PULL_HOSTS`` allows."""
    try:
        target = outbound.check_url(str(current.join(location)), max_length=MAX_URL_LENGTH)
    except httpx.InvalidURL as exc:
        raise PullError(f"{what}: the registry redirected to an invalid URL") from exc
    except outbound.RefusedURL as exc:
        raise PullError(f"{what}: the registry redirected to a URL that {exc}") from exc
    if current.scheme == "https" and target.scheme != "https":
        raise PullError(f"{what}: the registry redirected from https to http")
    host = f"[{target.host}]" if ":" in target.host else target.host
    host = f"{host}:{target.port}" if target.port else host
    if hosts is not None and not allowed_host(host, hosts):
        raise PullError(f"{what}: the registry redirected to {host}, which CORRAL_PULL_HOSTS does not allow")
    return target


def _manifest(http: httpx.Client, name: ModelName, *, insecure: bool, hosts: list[str] | None) -> dict[str, Any]:
    with contextlib.closing(_get(http, manifest_url(name, insecure=insecure), hosts=hosts, what="pull model manifest",
                                 headers={"Accept": MANIFEST_MEDIA_TYPE})) as reply:
        if reply.status_code == 404:
            raise PullError(PULL_NOT_FOUND)
        if reply.status_code != 200:  # the status alone: the body is whatever answered, maybe not a registry
            raise PullError(f"pull model manifest: {reply.status_code}")
        reply.read()
    try:
        manifest: dict[str, Any] = reply.json()
        refs = [manifest["config"], *manifest["layers"]]
        if not all(isinstance(r["digest"], str) and isinstance(r.get("size", 0), int) for r in refs):
            raise ValueError("layers")
        if not any(r.get("mediaType") == MODEL_MEDIA_TYPE for r in manifest["layers"]):
            raise PullError("pull model manifest: the manifest has no model layer")
    except (ValueError, KeyError, TypeError) as exc:
        raise PullError("pull model manifest: the registry's answer is not a manifest") from exc
    return manifest


def _blob(
    http: httpx.Client, store: ModelStore, name: ModelName, ref: dict[str, Any], *, insecure: bool,
    hosts: list[str] | None,
) -> Iterator[dict[str, Any]]:
    """Download one blob (resuming its partial file), check it, make it visible; progress as Ollama reports it."""
    digest, total = ref["digest"], int(ref.get("size", 0))
    path = store.blob_path(digest)  # raises for a malformed digest
    status = f"pulling {digest.split(':', 1)[-1][:12]}"
    if path.is_file():
        yield {"status": status, "digest": digest, "total": total, "completed": total}
        return
    partial = path.with_name(path.name + "-partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    start = partial.stat().st_size if partial.is_file() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    url = blob_url(name, digest, insecure=insecure)
    with contextlib.closing(_get(http, url, hosts=hosts, what=f"pull {digest}", headers=headers)) as reply:
        if reply.status_code == 200:
            start = 0  # the server ignored the Range: start over
        elif reply.status_code != 206:
            raise PullError(f"pull {digest}: {reply.status_code}")
        completed, last = start, 0.0
        with open(partial, "r+b" if start else "wb") as fh:  # "wb" starts the file over
            fh.seek(start)
            for chunk in reply.iter_bytes(CHUNK):
                fh.write(chunk)
                completed += len(chunk)
                now = time.monotonic()
                if now - last >= PROGRESS_SECONDS:
                    last = now
                    yield {"status": status, "digest": digest, "total": total, "completed": completed}
    yield {"status": status, "digest": digest, "total": total, "completed": completed}
    h = hashlib.sha256()
    with open(partial, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    if f"sha256:{h.hexdigest()}" != digest:
        partial.unlink(missing_ok=True)  # a bad download is not resumed
        raise PullError(f'digest mismatch, file must be downloaded again: expected "{digest}", got "sha256:{h.hexdigest()}"')
    os.replace(partial, path)


def _with_corral_config(store: ModelStore, manifest: dict[str, Any]) -> dict[str, Any]:
    """The registry's config blob names the model's family and quantization; corral's also holds what it reads
    from the GGUF header once (capabilities, context length, vocabulary size, model_info), so the manifest
    written locally points at a config with both."""
    model = next(r for r in manifest["layers"] if r.get("mediaType") == MODEL_MEDIA_TYPE)
    try:
        registry_config = json.loads(store.blob_path(manifest["config"]["digest"]).read_bytes())
    except (OSError, ValueError):
        registry_config = {}
    try:
        facts = gguf_config(Path(store.blob_path(model["digest"])))
    except Exception as exc:  # the gguf reader's many ways to say "this file is broken"
        raise PullError(f"the pulled model is not a GGUF file llama.cpp can read: {type(exc).__name__}") from exc
    config = {**(registry_config if isinstance(registry_config, dict) else {}), **facts}
    digest, size = store.write_blob_bytes(json.dumps(config, sort_keys=True).encode())
    return {**manifest, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": size}}
