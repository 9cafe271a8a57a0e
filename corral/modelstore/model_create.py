"""Building a model for ``/api/create``: check a create request whole (its layers, its files, a quantization),
then write the new layers and the manifest into the store, with Ollama's progress lines.

A new GGUF, a Hugging Face model to convert, LoRA adapters and vision projectors are checked here; what only
llama.cpp can do (load the files, quantize) goes through a :class:`ModelBuilder`, which the API's gateway sends
to a worker.  The layers it writes are read back and applied to requests by :mod:`corral.modelstore.layers`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

from corral.errors import BadRequest
from corral.modelstore.gguf_meta import GGUF_MAGIC, gguf_config
from corral.modelstore.gotemplate import parse as parse_template
from corral.modelstore.store import (
    CONFIG_MEDIA_TYPE,
    LAYER_MEDIA_PREFIX,
    MANIFEST_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    ModelName,
    ModelStore,
    sha256_file,
)
from corral.options import parse_options
from corral.protocol import QUANT_TYPES, QUANTIZABLE_FROM

MESSAGE_ROLES = ("system", "user", "assistant", "tool")


# -- layers from an /api/create request ---------------------------------------------------------------------


def check_parameters(parameters: Any) -> dict[str, Any]:
    """``parameters`` of /api/create: Ollama's options, with the same types and ranges as a request's."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object of options")
    stop = parameters.get("stop")
    if isinstance(stop, str):
        parameters = {**parameters, "stop": [stop]}
    return parse_options(parameters)


def check_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        return []
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content", ""), str) for m in messages
    ):
        raise BadRequest(f"messages must be a list of {{role, content}} with a role among {', '.join(MESSAGE_ROLES)}")
    return [{"role": m["role"], "content": m.get("content", "")} for m in messages]


# -- /api/create ----------------------------------------------------------------------------------------------



def _relative(filename: str) -> None:
    parts = filename.replace("\\", "/").split("/")
    if filename.startswith(("/", "\\")) or ".." in parts or (len(filename) > 1 and filename[1] == ":"):
        raise BadRequest("file path must be relative")


class ModelBuilder(Protocol):
    """The llama.cpp work of a create, which only workers can do (the API's gateway sends it to one)."""

    def check(self, model_digest: str, adapters: list[str], projectors: list[str] | None = None) -> None:
        """Raise :class:`BadRequest` in llama.cpp's words when it cannot load the blob with these adapter and
        projector blobs."""

    def quantize(self, model_digest: str, quant: str) -> Iterator[dict[str, Any]]:
        """Progress ``{"completed", "total"}``, then the quantized blob's ``{"digest", "size"}``."""


def create_model(
    store: ModelStore, name: str, *, base: str = "", files: dict[str, str] | None = None, system: str | None = None,
    parameters: dict[str, Any] | None = None, messages: list[dict[str, Any]] | None = None,
    license: str | list[str] | None = None, template: str | None = None, adapters: dict[str, str] | None = None,
    quantize: str | None = None, builder: ModelBuilder | None = None,
) -> Iterator[dict[str, Any]]:
    """Check a create request whole (raising :class:`BadRequest` and writing nothing on any problem), then
    return the steps that write it, as Ollama's progress objects.  A new GGUF and new adapters are loaded by
    llama.cpp (through ``builder``) before anything is written; quantizing happens in the steps.  The new layers
    and the manifest are written under the store's lock, so a delete's sweep of unused blobs cannot take them."""
    try:
        ModelName.parse(name)
    except BadRequest as exc:
        raise BadRequest("invalid model name") from exc
    if re.fullmatch(r"sha256[:-][0-9a-f]{64}", base or ""):  # `from` a blob: the uploaded GGUF itself
        files, base = {**(files or {}), "model.gguf": base.replace("-", ":", 1)}, ""
    if not base and not files:
        raise BadRequest("neither 'from' or 'files' was specified")
    if template is not None:
        parse_template(template)  # outside the supported subset: a 400 now, never a wrong prompt later
    options = check_parameters(parameters)
    prefix = check_messages(messages)
    licenses = [license] if isinstance(license, str) else list(license or [])
    kept: list[dict[str, Any]]
    model_layer: dict[str, Any]
    if files and not base:
        gguf, config, projectors = _files_gguf(store, files, name)
        converted = not any(filename.lower().endswith(".gguf") for filename in files)
        model_layer = _blob_layer("model", gguf)
        kept = [model_layer, *(_blob_layer("projector", path) for path in projectors)]
    else:
        store.get(base)  # a model that is not there, or whose blob is missing, is Ollama's 404
        source = store.manifest(base)
        kept = list(source["layers"])
        if files:  # FROM a model, and FROM ./mmproj.gguf: the model's layers with this projector
            kept = [ref for ref in kept if not ref["mediaType"].endswith(".projector")]
            kept += [_blob_layer("projector", path) for path in _projector_files(store, files)]
        config = json.loads(store.blob_path(source["config"]["digest"]).read_bytes())
        model_layer = next(ref for ref in kept if ref["mediaType"] == MODEL_MEDIA_TYPE)
        converted = False
    quant = _quant_type(quantize, str(config.get("file_type") or "unknown")) if quantize else None
    adapter_layers = [_adapter_layer(store, filename, digest, config) for filename, digest in (adapters or {}).items()]
    if files or adapter_layers:  # llama.cpp must load it: fail now, not at the first chat
        if builder is None:
            raise BadRequest("creating a model from a new file needs a worker to check it")
        model_digest = model_layer["digest"].split(":", 1)[1]
        projector_digests = [ref["digest"].split(":", 1)[1] for ref in kept if ref["mediaType"].endswith(".projector")]
        builder.check(model_digest, [ref["digest"].split(":", 1)[1] for ref in adapter_layers], projector_digests)
    if quant and builder is None:
        raise BadRequest("quantizing needs a worker")
    new: dict[str, list[bytes]] = {}
    if template is not None:
        new["template"] = [template.encode()]
    if system is not None:
        new["system"] = [system.encode()]
    if options:
        new["params"] = [json.dumps(options).encode()]
    if prefix:
        new["messages"] = [json.dumps(prefix).encode()]
    if licenses:
        new["license"] = [text.encode() for text in licenses]
    if adapter_layers:
        kept = [ref for ref in kept if not ref["mediaType"].endswith(".adapter")] + adapter_layers
    read = ("converting model", "parsing GGUF") if converted else ("parsing GGUF",) if files else ()
    return _write_model(store, name, kept, config, new, read=read,
                        quantize=(builder, quant) if quant and builder else None)


def _files_gguf(store: ModelStore, files: dict[str, str], name: str) -> tuple[Path, dict[str, Any], list[Path]]:
    """The GGUF blob that ``files`` holds, or the GGUF converted from the Hugging Face model they hold (its
    ``.safetensors``, ``config.json`` and tokenizer files), added to the store, with its config (each GGUF's
    header is read once: a tokenizer's arrays take seconds); and the vision projector GGUFs among them (an
    ``mmproj`` file beside the model's, as ``ollama create`` sends a Modelfile's two FROMs)."""
    paths = {filename: _blob(store, filename, digest) for filename, digest in files.items()}
    configs = {path: _read_config(path) for filename, path in paths.items() if filename.lower().endswith(".gguf")}
    projectors = [path for path, config in configs.items() if is_projector(config["model_info"])]
    models = [path for path in configs if path not in projectors]
    if len(models) == 1:
        return models[0], configs[models[0]], projectors
    if len(models) > 1:
        raise BadRequest("files must hold exactly one .gguf model file (and any vision projector files)")
    if projectors:
        raise BadRequest("files hold a vision projector but no model: add the model's .gguf file")
    if any(filename.endswith(".safetensors") for filename in paths):
        converted = _convert_safetensors(store, paths, name)
        return converted, _read_config(converted), []
    raise BadRequest("files must hold a .gguf file, or a Hugging Face model's .safetensors with its config.json")


def _convert_safetensors(store: ModelStore, paths: dict[str, Path], name: str) -> Path:
    """Convert uploaded safetensors to an F16 GGUF in the store: BERT sentence-embedding models, with corral's
    converter (corral/modelstore/convert_bert.py, the one that makes the default all-minilm); other architectures get a
    400 that says how to convert them."""
    from corral.modelstore.convert_bert import ConversionError, convert

    with tempfile.TemporaryDirectory(dir=store.root, prefix=".convert-") as tmp:
        source = Path(tmp)
        for filename, path in paths.items():
            (source / filename).parent.mkdir(parents=True, exist_ok=True)
            (source / filename).symlink_to(path)
        try:
            config = json.loads((source / "config.json").read_text())
        except FileNotFoundError as exc:
            raise BadRequest("files hold safetensors without their config.json") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"config.json is not valid JSON: {exc}") from exc
        kind = config.get("model_type") if isinstance(config, dict) else None
        if kind != "bert":
            raise BadRequest(f"corral converts safetensors of BERT embedding models only, and this is {kind!r}: "
                             "convert it with llama.cpp's convert_hf_to_gguf.py and create the model from the GGUF")
        output = source / "model.gguf"
        try:
            convert(source, output, name=ModelName.parse(name).model)
        except (ConversionError, OSError, KeyError, ValueError) as exc:
            raise BadRequest(f"converting the safetensors failed: {exc}") from exc
        digest = store.add_blob_file(output, digest=sha256_file(output))
    return store.blob_path(digest)


def _read_config(gguf: Path) -> dict[str, Any]:
    with open(gguf, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise BadRequest(f"{gguf.name} is not a GGUF file")
    try:
        return gguf_config(gguf)
    except Exception as exc:  # the gguf reader's many ways to say "this file is broken"
        raise BadRequest(f"the GGUF file could not be read: {type(exc).__name__}: {exc}") from exc


def _quant_type(quantize: str, file_type: str) -> str:
    """The llama.cpp type name for ``quantize`` (any case), checked against the source's type (Ollama's words)."""
    wanted = next((q for q in QUANT_TYPES if q.lower() == quantize.lower()), None)
    if wanted is None:
        raise BadRequest(f"unsupported quantization type {quantize}")
    if file_type not in QUANTIZABLE_FROM:
        raise BadRequest(f"quantization is only supported for F16 and F32 models (and Q8_0, BF16); this one is {file_type}")
    return wanted


def _projector_files(store: ModelStore, files: dict[str, str]) -> list[Path]:
    """The blobs of ``files`` given beside ``from``: vision projectors only (the model comes from ``from``)."""
    found = []
    for filename, digest in files.items():
        path = _blob(store, filename, digest)
        if not filename.lower().endswith(".gguf") or not is_projector(_read_config(path)["model_info"]):
            raise BadRequest(f"{filename}: with 'from' a model, files may only hold vision projector GGUFs")
        found.append(path)
    return found


def is_projector(info: dict[str, Any]) -> bool:
    """A vision projector GGUF (an ``mmproj`` file), by Ollama's test (``isProjectorGGUF``)."""
    if info.get("general.type") in ("projector", "mmproj"):
        return True
    return info.get("general.architecture") == "clip" and bool(
        info.get("clip.has_vision_encoder") or info.get("clip.has_audio_encoder"))


def _blob(store: ModelStore, filename: str, digest: str) -> Path:
    """The stored blob an uploaded file names (its name checked to stay inside the model's directory)."""
    _relative(filename)
    path = store.blob_path(digest)
    if not path.is_file():
        raise BadRequest(f"blob {digest} not found: upload it first (POST /api/blobs/{digest})")
    return path


def _blob_layer(kind: str, path: Path) -> dict[str, Any]:
    """The manifest layer of a stored blob (``application/vnd.ollama.image.<kind>``)."""
    return {"mediaType": LAYER_MEDIA_PREFIX + kind, "digest": "sha256:" + path.name.split("-", 1)[1],
            "size": path.stat().st_size}


def _adapter_layer(store: ModelStore, filename: str, digest: str, config: dict[str, Any]) -> dict[str, Any]:
    """The manifest layer for a LoRA adapter blob, checked to be a GGUF adapter for the model's architecture."""
    path = _blob(store, filename, digest)
    info = _read_config(path)["model_info"]
    if info.get("general.type") != "adapter" or info.get("adapter.type") != "lora":
        raise BadRequest(f"{filename} is not a LoRA adapter in GGUF format (general.type = adapter, adapter.type = lora)")
    arch, base_arch = info.get("general.architecture"), config.get("model_family")
    if base_arch and arch != base_arch:
        raise BadRequest(f"the adapter {filename} is for {arch} models, not {base_arch}")
    return _blob_layer("adapter", path)


def _write_model(
    store: ModelStore, name: str, kept: list[dict[str, Any]], config: dict[str, Any], new: dict[str, list[bytes]],
    *, read: tuple[str, ...], quantize: tuple[ModelBuilder, str] | None,
) -> Iterator[dict[str, Any]]:
    yield {"status": "reading model metadata"}
    for status in read:
        yield {"status": status}
    with store.writing():
        for ref in kept:  # a delete's sweep may have taken a blob that no manifest named yet (an upload)
            if not store.has_blob(ref["digest"]):
                raise BadRequest(f"blob {ref['digest']} was removed while the model was created; try again")
        if quantize is not None:  # under the lock: the new blob has no manifest yet, a delete must not sweep it
            kept, config = yield from _quantized(store, quantize, kept, config)
        layers = [ref for ref in kept if ref["mediaType"].rsplit(".", 1)[-1] not in new]
        for ref in layers:
            yield {"status": f"using existing layer {ref['digest']}"}
        for kind, blobs in new.items():
            for data in blobs:
                existed = store.has_blob(hashlib.sha256(data).hexdigest())
                digest, size = store.write_blob_bytes(data)
                yield {"status": f"{'using existing' if existed else 'creating new'} layer sha256:{digest}"}
                layers.append({"mediaType": LAYER_MEDIA_PREFIX + kind, "digest": f"sha256:{digest}", "size": size})
        config_digest, config_size = store.write_blob_bytes(json.dumps(config, sort_keys=True).encode())
        yield {"status": "writing manifest"}
        store.write_manifest(name, {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": f"sha256:{config_digest}", "size": config_size},
            "layers": layers,
        })
    yield {"status": "success"}


def _quantized(
    store: ModelStore, quantize: tuple[ModelBuilder, str], kept: list[dict[str, Any]], config: dict[str, Any]
) -> Generator[dict[str, Any], None, tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Quantize the model layer with Ollama's progress lines; the layers and config with the quantized blob."""
    builder, quant = quantize
    source = next(ref for ref in kept if ref["mediaType"] == MODEL_MEDIA_TYPE)
    status = f"quantizing {config.get('file_type')} model to {quant}"
    yield {"status": status}
    result: dict[str, Any] = {}
    for step in builder.quantize(source["digest"].split(":", 1)[1], quant):
        if "digest" in step:
            result = step
        else:
            yield {"status": status, "digest": "0", "total": step["total"], "completed": step["completed"]}
    if not result:
        raise BadRequest("the worker ended the quantization without a result")
    layer = {"mediaType": MODEL_MEDIA_TYPE, "digest": result["digest"], "size": int(result["size"])}
    quantized = gguf_config(store.blob_path(result["digest"]))
    keep = ("capabilities",)  # what the source's config says beyond the GGUF (a template's tools)
    config = {**quantized, **{key: config[key] for key in keep if key in config}}
    return [layer if ref is source else ref for ref in kept], config
