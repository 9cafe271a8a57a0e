"""``pull`` over the network: Ollama's registry protocol (``registry.ollama.ai``, any other registry host, and
``hf.co/{user}/{repo}[:{quant}]``, which Hugging Face serves the same way).

A name ``[host/][namespace/]model[:tag]`` is fetched as Ollama fetches it: the manifest from
``{scheme}://{host}/v2/{namespace}/{model}/manifests/{tag}``, then each blob by digest from ``.../blobs/{digest}``
(redirects followed), ``https`` unless the request says ``insecure``.  A blob downloads into
``blobs/sha256-<hex>-partial``, resumed with an HTTP ``Range`` after an interruption, and becomes visible only once
its sha256 matches.  The manifest is written last, under the store's lock, so an interrupted pull leaves no model
registered, and a delete cannot sweep the blobs of a pull in progress.  The two default models stay in the
packaged catalog (:mod:`corral.catalog`), which needs no network.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corral.catalog import PULL_NOT_FOUND, PullError
from corral.errors import Forbidden
from corral.gguf_meta import gguf_config
from corral.store import CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MODEL_MEDIA_TYPE, ModelName, ModelStore

PROGRESS_SECONDS = 0.1  # at most one progress line per layer this often (Ollama: about every 60 ms)
CHUNK = 1 << 20


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
    if hosts is not None and not any(fnmatch.fnmatchcase(name.host, pattern.lower()) for pattern in hosts):
        raise Forbidden(f"pulling from {name.host} is not allowed on this server (CORRAL_PULL_HOSTS)")
    http = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=15.0),
                                  headers={"User-Agent": "corral (ollama-compatible)"})
    try:
        yield {"status": "pulling manifest"}
        manifest = _manifest(http, name, insecure=insecure)
        refs = [manifest["config"], *manifest["layers"]]
        with store.writing():
            for ref in refs:
                yield from _blob(http, store, name, ref, insecure=insecure)
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            store.write_manifest(text, _with_corral_config(store, manifest))
        yield {"status": "success"}
    except httpx.HTTPError as exc:
        raise PullError(f"pull failed: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:  # the disk filled, say: the partial file stays for the next try
        raise PullError(f"pull failed: {exc.strerror or exc}") from exc
    finally:
        if client is None:
            http.close()


def _manifest(http: httpx.Client, name: ModelName, *, insecure: bool) -> dict[str, Any]:
    reply = http.get(manifest_url(name, insecure=insecure), headers={"Accept": MANIFEST_MEDIA_TYPE})
    if reply.status_code == 404:
        raise PullError(PULL_NOT_FOUND)
    if reply.status_code != 200:
        raise PullError(f"pull model manifest: {reply.status_code} {reply.text[:200]}")
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
    http: httpx.Client, store: ModelStore, name: ModelName, ref: dict[str, Any], *, insecure: bool
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
    with http.stream("GET", blob_url(name, digest, insecure=insecure), headers=headers) as reply:
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
