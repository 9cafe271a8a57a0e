"""Pull models from another corral server, for workers on machines that do not share the model store.

``corral worker --pull-from http://api:11434`` copies each model it will serve: the manifest
(``GET /api/manifests/{name}``), then every blob it names that is not already here
(``GET /api/blobs/sha256:...``, streamed to disk and checked against its digest before it becomes visible).
Blobs already present are not fetched again, so a restart costs one small request per model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx

from corral.errors import BadRequest, CorralError, ModelNotFound
from corral.modelstore.store import ModelStore

log = logging.getLogger(__name__)


def pull_from_server(
    store: ModelStore, base_url: str, names: list[str] | None = None, *, api_key: str | None = None,
    client: httpx.Client | None = None, progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Copy ``names`` into ``store``, or by default every model the server lists that this store lacks or holds
    in another version (a worker's periodic sync); return the names copied."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    own = client is None
    http = client or httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=300))
    say = progress or log.info
    try:
        if names is None:
            listed = _json(http.get("/api/tags"), "list models")["models"]
            names = [m["name"] for m in listed if _local_digest(store, m["name"]) != m.get("digest")]
        pulled = []
        for name in names:
            reply = http.get(f"/api/manifests/{name}")
            if reply.status_code == 404:
                raise ModelNotFound(f"model '{name}' not found on {base_url}")
            manifest = _json(reply, f"read the manifest of {name}")
            with store.writing():  # a delete's blob sweep waits until the manifest names these blobs
                for ref in [manifest["config"], *manifest["layers"]]:
                    digest = ref["digest"]
                    if store.has_blob(digest):
                        continue
                    say(f"pulling {digest[:19]} ({int(ref.get('size', 0)) / 1e6:.1f} MB) for {name} from {base_url}")
                    with http.stream("GET", f"/api/blobs/{digest}") as stream:
                        if stream.status_code != 200:
                            raise CorralError(f"cannot fetch blob {digest} from {base_url}: HTTP {stream.status_code}")
                        store.write_blob_stream(digest, stream.iter_bytes(1 << 20))
                store.write_manifest(name, manifest)
            pulled.append(name)
        return pulled
    except httpx.HTTPError as exc:
        raise CorralError(f"cannot pull models from {base_url}: {exc}") from exc
    finally:
        if own:
            http.close()


def _local_digest(store: ModelStore, name: str) -> str | None:
    try:
        return store.get(name).digest
    except (ModelNotFound, BadRequest):
        return None


def _json(reply: httpx.Response, what: str) -> dict:  # type: ignore[type-arg]
    if reply.status_code != 200:
        raise CorralError(f"cannot {what}: HTTP {reply.status_code} {reply.text[:200]}")
    return reply.json()  # type: ignore[no-any-return]
