"""What a GGUF file says about its model, read from its header without loading it: the metadata ``/api/show``
lists, and the config blob the store writes once at registration for ``/api/tags``, the capabilities and the
workers."""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
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
    header = read_header(path, with_arrays=with_arrays)
    return header.kv, header.parameters


@dataclass
class GGUFHeader:
    """A GGUF file's header, as :func:`read_header` found it."""

    kv: dict[str, Any]
    tensors: list[tuple[str, tuple[int, ...]]]  # name and shape (ggml's order: the row length first)
    byteorder: str  # struct's: "<" or ">"
    version: int
    spans: dict[str, tuple[int, int]]  # each key/value's bytes in the file: [start, end)
    tensor_info: tuple[int, int]  # the tensor descriptions' bytes
    data_offset: int  # where the tensors' data starts (aligned)

    @property
    def parameters(self) -> int:
        """The tensors' elements, all together."""
        return sum(math.prod(shape) for _, shape in self.tensors)


# GGUF value types: struct format and size of the fixed-size ones; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path, *, with_arrays: bool = True) -> GGUFHeader:
    """Parse a GGUF header with ``struct``, skipping what it need not decode.  The ``gguf`` package's reader
    builds a numpy view of every element of every array: 3.5 s for SmolLM2's 49k-token vocabulary on this
    project's VM (seconds more for today's 128k-150k vocabularies), on every create, pull and verbose
    ``/api/show``; this takes ~0.1 s.  Arrays come back as lists, or ``[]`` unless ``with_arrays`` (the
    vocabulary's length is kept as :data:`VOCAB_SIZE_KEY`).  A malformed file raises ``ValueError``."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _Parser(data, with_arrays).header()


class _Parser:
    def __init__(self, data: mmap.mmap, with_arrays: bool) -> None:
        self.data, self.size, self.with_arrays, self.at = data, len(data), with_arrays, 0
        self.order = "<"

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(self.order + fmt)
        if self.at + size > self.size:
            raise ValueError("the GGUF header is truncated")
        value = struct.unpack_from(self.order + fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        if self.at + length > self.size:
            raise ValueError("the GGUF header is truncated")
        start, self.at = self.at, self.at + length
        return self.data[start : self.at].decode("utf-8")

    def skip_strings(self, count: int) -> None:
        unpack, data, at = struct.Struct(self.order + "Q").unpack_from, self.data, self.at
        for _ in range(count):
            if at + 8 > self.size:
                raise ValueError("the GGUF header is truncated")
            at += 8 + unpack(data, at)[0]
        if at > self.size:
            raise ValueError("the GGUF header is truncated")
        self.at = at

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        inner, count = self.take("I"), self.take("Q")
        least = struct.calcsize(_SCALARS[inner]) if inner in _SCALARS else 8 if inner == _STRING else 12
        if count * least > self.size - self.at:  # a count no file of this size can hold
            raise ValueError("the GGUF header is truncated")
        if not keep:
            if inner in _SCALARS:
                self.at += count * least
            elif inner == _STRING:
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.value(inner, keep=False)
            return count
        if inner in _SCALARS:
            fmt = f"{self.order}{count}{_SCALARS[inner]}"
            values = list(struct.unpack_from(fmt, self.data, self.at))
            self.at += count * least
            return values
        return [self.value(inner) for _ in range(count)]

    def header(self) -> GGUFHeader:
        if self.data[:4] != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        self.at = 4
        version = self.take("I")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, self.at = ">", 4
            version = self.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        tensor_count, kv_count = self.take("Q"), self.take("Q")
        kv: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(kv_count):
            start = self.at
            key, kind = self.string(), self.take("I")
            keep = self.with_arrays or kind != _ARRAY
            value = self.value(kind, keep=keep)
            if not keep:
                if key == "tokenizer.ggml.tokens":
                    kv[VOCAB_SIZE_KEY] = value  # the length is all the API needs (to bound token ids)
                value = []
            kv[key] = value
            spans[key] = (start, self.at)
        info_start, tensors = self.at, []
        for _ in range(tensor_count):
            name, dims = self.string(), self.take("I")
            if dims > 8:
                raise ValueError(f"a tensor of {dims} dimensions")
            tensors.append((name, tuple(self.take("Q") for _ in range(dims))))
            self.at += 12  # type (uint32) and data offset (uint64)
        if self.at > self.size:
            raise ValueError("the GGUF header is truncated")
        alignment = kv.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("general.alignment must be a power of two")
        data_offset = -(-self.at // alignment) * alignment
        return GGUFHeader(kv, tensors, self.order, version, spans, (info_start, self.at), data_offset)


RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK (gguf.PoolingType.RANK)
# The converter's names for a sequence-classification head (BERT's and XLM-R's cls.output, Jina's cls).
CLASSIFIER_HEADS = frozenset({"cls.weight", "cls.output.weight"})


def is_reranker(arch: str, kv: dict[str, Any], tensors: set[str]) -> bool:
    """A cross-encoder: rank pooling in its metadata (Qwen3-Reranker), or a classifier head on an encoder (the
    converter writes no pooling type for BERT and XLM-R cross-encoders, but keeps ``cls.output``, or Jina's
    ``cls``)."""
    if kv.get(f"{arch}.pooling_type") == RANK_POOLING:
        return True
    return arch in EMBEDDING_ARCHITECTURES and bool(CLASSIFIER_HEADS & tensors)


def gguf_config(path: Path) -> dict[str, Any]:
    """The config blob for a GGUF: the facts /api/tags and the workers need, read once."""
    import gguf

    header = read_header(path, with_arrays=False)
    kv, params = header.kv, header.parameters
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
    if is_reranker(arch, kv, {name for name, _ in header.tensors}):
        capabilities = ["rerank"]
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
        # /api/show's model_info (arrays elided), read here once, not on every request: a header with a large
        # vocabulary still takes a tenth of a second or more to walk.
        "model_info": kv,
    }
