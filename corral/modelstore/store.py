"""The on-disk model store, laid out as Ollama lays out ``OLLAMA_MODELS``.

``blobs/sha256-<hex>`` holds content-addressed files (a GGUF, a small JSON config) and
``manifests/<host>/<namespace>/<model>/<tag>`` names them; ``derived/`` holds copies workers make of a blob
(workers/weights.py), removed with it.  The API reads it to list, show, copy and delete
models; workers read it to find the GGUF a queue is about.  A model's GGUF facts (family, parameter count,
quantization, context length) are read once, when it is registered, into the config blob, so listing never
opens a GGUF.  Blobs may be symbolic links: the default model is linked from its Python package rather than
copied (100 MB saved per install).
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from corral.errors import BadRequest, IncompleteModel, ModelNotFound
from corral.modelstore.gguf_meta import gguf_config

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
LAYER_MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL_MEDIA_TYPE = LAYER_MEDIA_PREFIX + "model"
# Layers that hold a few bytes of text or JSON each, read with the manifest.
TEXT_LAYERS = ("system", "params", "messages", "license", "template")
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"

_PART = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,79}$")
_HOST = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:-]{0,349}$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


@dataclass(frozen=True)
class ModelName:
    """A parsed ``[host/][namespace/]model[:tag]``; always lower-case, so lookups ignore case."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse and validate a name; raise :class:`BadRequest` for anything that could escape the store."""
        raw = (text or "").strip()
        if not raw or "\x00" in raw or raw.startswith("/") or "\\" in raw:
            raise BadRequest("invalid model name")
        path, tag = raw, DEFAULT_TAG
        last = raw.rsplit("/", 1)[-1]
        if ":" in last:
            path, tag = raw.rsplit(":", 1)
        parts = path.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, (namespace, model) = DEFAULT_HOST, parts
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise BadRequest("invalid model name")
        if not (_HOST.match(host) and _PART.match(namespace) and _PART.match(model) and _TAG.match(tag)):
            raise BadRequest("invalid model name")
        if ".." in host or ".." in namespace or ".." in model or ".." in tag:
            raise BadRequest("invalid model name")
        return cls(host.lower(), namespace.lower(), model.lower(), tag.lower())

    @property
    def display(self) -> str:
        """Shortest form, as Ollama prints it: ``llama3.2:latest``, ``me/model:tag``, ``host/ns/m:tag``."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def manifest_path(self, root: Path) -> Path:
        return root / "manifests" / self.host / self.namespace / self.model / self.tag


@dataclass(frozen=True)
class ModelRecord:
    """What the store knows about one named model, without opening its GGUF."""

    name: ModelName
    digest: str  # sha256 hex of the manifest, as /api/tags reports it
    model_digest: str  # sha256 hex of the GGUF blob: routing key for worker queues
    model_path: Path
    size: int
    modified_at: datetime
    config: dict[str, Any]
    # The text of the model's small layers by kind ("system", "params", "messages", "license", "template"),
    # as `ollama create` writes them: what a request gets by default (corral/modelstore/layers.py applies them).
    extras: dict[str, list[str]] = field(default_factory=dict)
    # LoRA adapters (``ADAPTER``, ``application/vnd.ollama.image.adapter`` layers), applied on top of the GGUF.
    adapter_paths: tuple[Path, ...] = ()
    # Vision projectors (``application/vnd.ollama.image.projector`` layers, an ``mmproj`` GGUF): images.
    projector_paths: tuple[Path, ...] = ()

    @property
    def capabilities(self) -> list[str]:
        """Ollama's capabilities (corral/modelstore/capabilities.py): from the config and the template layer."""
        from corral.modelstore.capabilities import derive

        template = self.extras.get("template")
        return derive(self.config, template[-1] if template else None, projector=bool(self.projector_paths))

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.capabilities

    def details(self) -> dict[str, Any]:
        """The ``details`` object of /api/tags, /api/show and /api/ps."""
        family = self.config.get("model_family", "")
        return {
            "parent_model": "",
            "format": self.config.get("model_format", "gguf"),
            "family": family,
            "families": self.config.get("model_families") or ([family] if family else None),
            "parameter_size": self.config.get("model_type", ""),
            "quantization_level": self.config.get("file_type", ""),
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MissingBlob(FileNotFoundError):
    """A manifest names a model blob the store does not have (deleted by hand, or an Ollama store half copied)."""


RECORD_CACHE_SIZE = 512  # manifests whose records a store keeps (emptied when full: a store has few models)


class ModelStore:
    """Blobs + manifests under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # Records read from manifests, by manifest path: every chat looks its model up (the API once, its worker
        # once), and reading a manifest's text layers and config took 0.2-0.3 ms of the time to first token on 2
        # cores.  The blobs a manifest names are content-addressed, so a manifest with the same sha256 (read
        # again each time: it is small) and mtime has the same record, whatever happened to the file between.
        self._records: dict[Path, tuple[ModelRecord | None, int]] = {}
        self._records_lock = threading.Lock()

    @contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """The store's lock file (``flock``, so the API's and every worker's processes share it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def writing(self) -> AbstractContextManager[None]:
        """Hold this while adding blobs and the manifest that names them (a pull, a create, a copy): a delete's
        sweep of unused blobs waits for it, so it never removes a blob whose manifest is not written yet.
        Writers do not wait for each other."""
        return self._lock(exclusive=False)

    # -- blobs ------------------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        m = _DIGEST.match(digest) or _DIGEST.match(f"sha256:{digest}")
        if not m:
            raise BadRequest("invalid digest format")
        return self.root / "blobs" / f"sha256-{m.group(1)}"

    def write_blob_bytes(self, data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(path, data)
        return digest, len(data)

    def add_blob_file(self, source: Path, *, link: bool = False, digest: str | None = None) -> str:
        """Put a file in the store (copy, or symlink when ``link``) and return its sha256 hex."""
        source = Path(source).resolve()
        digest = digest or self._cached_digest(source)
        path = self.blob_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if link:
            if path.is_symlink() and Path(os.readlink(path)) == source:
                return digest
            if path.exists() and not path.is_symlink():
                return digest  # a real copy is already there
            tmp = path.with_name(f".{path.name}.{os.getpid()}.lnk")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(source)
            os.replace(tmp, path)
        elif not path.exists() or path.is_symlink():
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
            os.close(fd)
            shutil.copyfile(source, tmp_name)
            os.replace(tmp_name, path)
        return digest

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def write_blob_stream(self, digest: str, chunks: Iterable[bytes]) -> Path:
        """Store a blob streamed from elsewhere, checked against its sha256 before it becomes visible."""
        path = self.blob_path(digest)
        expected = path.name.split("-", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    h.update(chunk)
                    fh.write(chunk)
            if h.hexdigest() != expected:
                raise BadRequest(f"digest mismatch for sha256:{expected}: received sha256:{h.hexdigest()}")
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        return path

    def _cached_digest(self, source: Path) -> str:
        """sha256 of a file, remembered by (path, size, mtime) so start-up does not re-hash 100 MB each time."""
        st = source.stat()
        cache_path = self.root / ".digests.json"
        key = f"{source}:{st.st_size}:{st.st_mtime_ns}"
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return str(cache[key])
        digest = sha256_file(source)
        cache[key] = digest
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(cache_path, json.dumps(cache).encode())
        return digest

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp_name, path)

    # -- manifests --------------------------------------------------------------------------------------

    def register_gguf(self, names: list[str], gguf_path: Path, *, link: bool = False) -> list[ModelRecord]:
        """Add a GGUF under one or more names (idempotent: unchanged files cost a stat, not a hash)."""
        with self.writing():
            return self._register_gguf(names, gguf_path, link=link)

    def _register_gguf(self, names: list[str], gguf_path: Path, *, link: bool) -> list[ModelRecord]:
        digest = self.add_blob_file(gguf_path, link=link)
        blob = self.blob_path(digest)
        records = []
        for text in names:
            name = ModelName.parse(text)
            existing = self._manifest(name)
            if existing and existing["layers"][0]["digest"] == f"sha256:{digest}":
                records.append(self.get(text))
                continue
            config = gguf_config(blob)
            config_digest, config_size = self.write_blob_bytes(json.dumps(config, sort_keys=True).encode())
            manifest = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": f"sha256:{config_digest}", "size": config_size},
                "layers": [{"mediaType": MODEL_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": blob.stat().st_size}],
            }
            self._write_manifest(name, manifest)
            records.append(self.get(text))
        return records

    def manifest(self, text: str) -> dict[str, Any]:
        """The manifest of a name (what ``GET /api/manifests/{name}`` serves to remote workers)."""
        found = self._manifest(ModelName.parse(text))
        if found is None:
            raise ModelNotFound(f"model '{text}' not found")
        return found

    def write_manifest(self, text: str, manifest: dict[str, Any]) -> ModelRecord:
        """Register a name for blobs already in the store (a pull from another corral server)."""
        with self.writing():
            for ref in [manifest["config"], *manifest["layers"]]:
                if not self.has_blob(ref["digest"]):
                    raise BadRequest(f"blob {ref['digest']} is missing")
            self._write_manifest(ModelName.parse(text), manifest)
        return self.get(text)

    def _write_manifest(self, name: ModelName, manifest: dict[str, Any]) -> None:
        path = name.manifest_path(self.root)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(path, json.dumps(manifest).encode())

    def _manifest(self, name: ModelName) -> dict[str, Any] | None:
        try:
            return dict(json.loads(name.manifest_path(self.root).read_bytes()))
        except FileNotFoundError:
            return None

    def _record(self, name: ModelName, path: Path, raw: bytes | None = None) -> ModelRecord:
        raw = path.read_bytes() if raw is None else raw
        manifest = json.loads(raw)
        layer = next(x for x in manifest["layers"] if x["mediaType"] == MODEL_MEDIA_TYPE)
        if not self.blob_path(layer["digest"]).exists():
            raise MissingBlob(f"model '{name.display}' is incomplete: its manifest names blob {layer['digest']}, "
                              "which is not in the store; pull or create it again")
        extras: dict[str, list[str]] = {}
        adapters: list[Path] = []
        projectors: list[Path] = []
        for ref in manifest["layers"]:
            kind = ref["mediaType"].rsplit(".", 1)[-1]
            if ref["mediaType"].startswith(LAYER_MEDIA_PREFIX) and kind in TEXT_LAYERS:
                extras.setdefault(kind, []).append(self.blob_path(ref["digest"]).read_text(errors="replace"))
            elif ref["mediaType"] == LAYER_MEDIA_PREFIX + "adapter":
                adapters.append(self.blob_path(ref["digest"]))
            elif ref["mediaType"] == LAYER_MEDIA_PREFIX + "projector":
                projectors.append(self.blob_path(ref["digest"]))
        config_ref = manifest["config"]
        config = json.loads(self.blob_path(config_ref["digest"]).read_bytes())
        size = int(config_ref["size"]) + sum(int(x["size"]) for x in manifest["layers"])
        mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).astimezone()
        return ModelRecord(
            name=name,
            digest=hashlib.sha256(raw).hexdigest(),
            model_digest=layer["digest"].split(":", 1)[1],
            model_path=self.blob_path(layer["digest"]),
            size=size,
            modified_at=mtime,
            config=config,
            extras=extras,
            adapter_paths=tuple(adapters),
            projector_paths=tuple(projectors),
        )

    def _cached_record(self, name: ModelName, path: Path) -> ModelRecord:
        raw = path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        mtime = path.stat().st_mtime_ns  # a manifest written again as it was: a new modified_at
        with self._records_lock:
            cached, cached_mtime = self._records.get(path, (None, 0))
        if cached is not None and cached.digest == digest and cached_mtime == mtime:
            if not cached.model_path.exists():  # removed under a manifest that stayed (a broken store)
                raise MissingBlob(f"model '{name.display}' is incomplete: its manifest names blob "
                                  f"sha256:{cached.model_digest}, which is not in the store; pull or create it "
                                  "again")
            return cached
        record = self._record(name, path, raw)
        with self._records_lock:
            if len(self._records) >= RECORD_CACHE_SIZE:
                self._records.clear()
            self._records[path] = (record, mtime)
        return record

    def get(self, text: str) -> ModelRecord:
        """Look a model up by name.

        :raises ModelNotFound: the name is valid but no manifest has it.
        :raises BadRequest: the name is invalid.
        """
        name = ModelName.parse(text)
        path = name.manifest_path(self.root)
        try:
            return self._cached_record(name, path)
        except MissingBlob as exc:
            raise IncompleteModel(str(exc)) from exc
        except (FileNotFoundError, StopIteration, KeyError, ValueError) as exc:
            raise ModelNotFound(f"model '{text}' not found") from exc

    def list(self) -> list[ModelRecord]:
        """Every model, newest first (as /api/tags sorts)."""
        base = self.root / "manifests"
        records = []
        if base.is_dir():
            for path in base.glob("*/*/*/*"):
                if not path.is_file() or path.name.startswith("."):
                    continue
                rel = path.relative_to(base).parts
                try:
                    records.append(self._record(ModelName(*rel), path))
                except (OSError, ValueError, KeyError, StopIteration):
                    continue  # a half-written or foreign manifest is not a model
        return sorted(records, key=lambda r: r.modified_at, reverse=True)

    def copy(self, source: str, destination: str) -> None:
        src_name, dst_name = ModelName.parse(source), ModelName.parse(destination)
        with self.writing():
            manifest = self._manifest(src_name)
            if manifest is None:
                raise ModelNotFound(f'model "{source}" not found')
            self._write_manifest(dst_name, manifest)

    def delete(self, text: str) -> None:
        """Remove a name, and every blob no remaining manifest refers to."""
        name = ModelName.parse(text)
        path = name.manifest_path(self.root)
        with self._lock(exclusive=True):  # no pull or create is between its blobs and its manifest
            if not path.is_file():
                raise ModelNotFound(f"model '{text}' not found")
            path.unlink()
            for parent in (path.parent, path.parent.parent, path.parent.parent.parent):
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._prune_blobs()

    def _prune_blobs(self) -> None:
        used: set[str] = set()
        for record_path in (self.root / "manifests").glob("*/*/*/*"):
            try:
                manifest = json.loads(record_path.read_bytes())
            except (OSError, ValueError):
                continue
            used.add(manifest["config"]["digest"].replace(":", "-"))
            used.update(x["digest"].replace(":", "-") for x in manifest["layers"])
        for blob in (self.root / "blobs").glob("sha256-*"):
            if blob.name not in used:
                blob.unlink(missing_ok=True)
        # Copies workers made of a blob (workers/weights.py: "<blob name>.<weights>.gguf") go with it.
        for derived in (self.root / "derived").glob("sha256-*"):
            if derived.name.split(".", 1)[0] not in used:
                derived.unlink(missing_ok=True)

    def names_using_blob(self, digest: str) -> builtins.list[ModelName]:
        """Every model whose manifest names the blob ``digest`` (its GGUF, config or any layer).  Reads the
        manifests only (a few hundred bytes each), never a config blob or a GGUF: it decides, per request, which
        keys may read a blob.

        :raises BadRequest: ``digest`` is not a sha256 digest.
        """
        wanted = "sha256:" + self.blob_path(digest).name.split("-", 1)[1]
        base = self.root / "manifests"
        names = []
        for path in base.glob("*/*/*/*") if base.is_dir() else ():
            if path.name.startswith("."):
                continue
            try:
                manifest = json.loads(path.read_bytes())
                refs = [manifest["config"], *manifest["layers"]]
                if any(ref["digest"] == wanted for ref in refs):
                    names.append(ModelName(*path.relative_to(base).parts))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a half-written or foreign manifest names no model
        return names

    def find_by_model_digest(self, model_digest: str) -> ModelRecord | None:
        for record in self.list():
            if record.model_digest == model_digest:
                return record
        return None
