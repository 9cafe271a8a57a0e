"""The model-admin service: pull, show and create, which the Ollama routes and the operator console both call.

Each operation takes plain values and returns plain data (a show's fields, or progress steps in Ollama's words),
so a view only parses, checks who may do it (read-only mode, an admin key), and shapes the reply: NDJSON or
its last line for the API, a streamed form for the console.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.modelstore import catalog, registry
from corral.modelstore.gguf_meta import read_gguf_metadata
from corral.modelstore.layers import licenses_of, messages_of, params_of, system_of, template_of
from corral.modelstore.model_create import create_model
from corral.modelstore.modelfile import modelfile_text, parameters_text
from corral.modelstore.store import ModelName
from corral.settings import Settings
from corral.timefmt import rfc3339

if TYPE_CHECKING:  # the inference module imports api.services, which builds this service
    from api.inference import Inference


@dataclass
class ModelAdmin:
    """Kept in :class:`api.services.Services` as ``models``; the store and the gateway are the inference service's."""

    settings: Settings
    inference: Inference

    def pull(self, name: str, *, insecure: bool = False) -> Iterator[dict[str, Any]]:
        """The progress steps of pulling ``name``: a default model from its package (no network), anything else
        from its registry (Ollama's, another host, or hf.co)."""
        ModelName.parse(name)
        store = self.inference.store
        if catalog.find(name) is not None:
            return catalog.pull(store, name)
        return registry.pull(store, name, insecure=insecure, hosts=self.settings.pull_hosts)

    def show(self, name: str, *, verbose: bool = False) -> dict[str, Any]:
        """Ollama's ``/api/show`` reply for ``name`` (its 404 text; the key's allow-list applies): the layers, the
        Modelfile that recreates it, and the GGUF's metadata (with its arrays when ``verbose``)."""
        display = ModelName.parse(name).display
        record = self.inference.model(name, not_found=f"model '{display}' not found")
        model_info = None if verbose else record.config.get("model_info")
        if model_info is None:  # verbose, or a model registered before the config blob kept model_info
            model_info, _ = read_gguf_metadata(record.model_path, with_arrays=verbose)
        template = template_of(record) or str(model_info.get("tokenizer.chat_template", ""))
        shown: dict[str, Any] = {
            "license": "\n".join(licenses_of(record)) or None,
            "modelfile": modelfile_text(record),
            "parameters": parameters_text(params_of(record)),
            "template": template,
            "system": system_of(record),
            "messages": messages_of(record) or None,
        }
        if record.projector_paths:  # a vision model: its projector's metadata, as Ollama shows it
            shown["projector_info"] = read_gguf_metadata(record.projector_paths[0], with_arrays=verbose)[0]
        return {
            **{key: value for key, value in shown.items() if value is not None},
            "details": record.details(),
            "model_info": model_info,
            "capabilities": record.capabilities,
            "modified_at": rfc3339(record.modified_at),
        }

    def create(
        self, name: str, *, base: str = "", files: dict[str, str] | None = None, system: str | None = None,
        parameters: dict[str, Any] | None = None, messages: list[dict[str, Any]] | None = None,
        license: str | list[str] | None = None, template: str | None = None, adapters: dict[str, str] | None = None,
        quantize: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Check a create request whole (a :class:`BadRequest` before anything is written), then the steps that
        write it (:func:`corral.modelstore.model_create.create_model`); a worker loads new files and quantizes."""
        return create_model(
            self.inference.store, name, base=base, files=files, system=system, parameters=parameters,
            messages=messages, license=license, template=template, adapters=adapters, quantize=quantize,
            builder=self.inference.gateway,
        )
