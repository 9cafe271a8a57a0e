"""What a GGUF file says about its model, read from its header without loading it (llama.cpp's own ``gguf``
package): the metadata ``/api/show`` lists, and the config blob the store writes once at registration for
``/api/tags``, the capabilities and the workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

EMBEDDING_ARCHITECTURES = {"bert", "nomic-bert", "jina-bert-v2", "jina-bert-v3", "modern-bert", "t5encoder"}


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber``: 134515008 -> "134.52M", 3212749824 -> "3.2B"."""
    for limit, suffix, decimals in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 0)):
        if n >= limit:
            value = n / limit
            if value == int(value):
                return f"{int(value)}{suffix}"
            return f"{value:.{decimals}f}{suffix}"
    return str(n)


VOCAB_SIZE_KEY = "tokenizer.ggml.tokens.length"


def read_gguf_metadata(path: Path, *, with_arrays: bool = False) -> tuple[dict[str, Any], int]:
    """Return (key/value metadata, parameter count) of a GGUF file.

    Arrays (the tokenizer's vocabulary, merges) are replaced by ``[]`` unless ``with_arrays``, as Ollama's
    /api/show does without ``verbose``.
    """
    import gguf  # imported lazily: only registration and /api/show need it

    reader = gguf.GGUFReader(str(path), "r")
    kv: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        if is_array and not with_arrays:
            kv[name] = []
            if name == "tokenizer.ggml.tokens":
                kv[VOCAB_SIZE_KEY] = len(field.data)  # the length is all the API needs (to bound token ids)
            continue
        try:
            value = field.contents()
        except Exception:  # a field type this gguf version cannot decode: leave it out, never fail a listing
            continue
        kv[name] = value
    params = sum(int(t.n_elements) for t in reader.tensors)
    return kv, params


def gguf_config(path: Path) -> dict[str, Any]:
    """The config blob for a GGUF: the facts /api/tags and the workers need, read once."""
    import gguf

    kv, params = read_gguf_metadata(path)
    arch = str(kv.get("general.architecture", ""))
    file_type = kv.get("general.file_type")
    quant: str
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.replace("MOSTLY_", "").replace("ALL_", "")  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no file type (None) or one this gguf does not know
        quant = "unknown"
    embedding = arch in EMBEDDING_ARCHITECTURES or f"{arch}.pooling_type" in kv
    template = str(kv.get("tokenizer.chat_template") or "")
    capabilities = ["embedding"] if embedding else ["completion"]
    if not embedding and "tools" in template:
        capabilities.append("tools")
    return {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch] if arch else None,
        "model_type": human_number(params),
        "file_type": quant,
        "parameter_count": params,
        "context_length": int(kv.get(f"{arch}.context_length") or 0),
        "embedding_length": int(kv.get(f"{arch}.embedding_length") or 0),
        "pooling_type": kv.get(f"{arch}.pooling_type"),
        "vocab_size": int(kv.pop(VOCAB_SIZE_KEY, 0)),
        "capabilities": capabilities,
        # /api/show's model_info (arrays elided): parsing a GGUF's header takes seconds (SmolLM2's 49k-token
        # vocabulary: ~4.5 s on 2 cores), so it is read here, once, not on every request.
        "model_info": kv,
    }
