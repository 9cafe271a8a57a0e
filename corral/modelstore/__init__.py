"""The model store and its formats: what a model is on disk and on the wire to registries, as Ollama keeps it.

- ``store``: names, manifests and blobs under ``OLLAMA_MODELS`` (Ollama's layout), and a model's record;
- ``registry``, ``remote``, ``catalog``: pulls from an OCI registry, from another corral, and of the packaged
  default models;
- ``gguf_meta``, ``convert_bert``: GGUF headers read without loading a model, and safetensors BERTs converted;
- ``model_create``, ``layers``, ``modelfile``: building a model for ``/api/create``, its small layers as they
  apply to a request, and Modelfile text;
- ``gotemplate``, ``goprintf``: the Go templates of TEMPLATE layers;
- ``capabilities``: what a model can do (completion, tools, thinking, vision, insert, embedding).

A subpackage as ``corral/wire/`` is for the protocols: the rest of ``corral/`` (settings, errors, options, the
broker and protocol, the request builder) is what every process shares.
"""
