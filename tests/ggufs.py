"""GGUF files the tests make with the ``gguf`` package: a LoRA adapter for SmolLM2 (a working one, and one whose
shapes fit no model), and a GGUF of an architecture llama.cpp does not know."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _arch(reader: object) -> str:
    return str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")  # type: ignore[attr-defined]


def lora_adapter(base: Path, target: Path, *, rank: int = 4, std: float = 0.2, misshapen: bool = False) -> Path:
    """A LoRA adapter on every ``ffn_down`` of ``base`` with random A and B (seeded), strong enough to change
    greedy output; ``misshapen`` swaps the input and output sizes, which llama.cpp must refuse."""
    import gguf

    reader = gguf.GGUFReader(base)
    writer = gguf.GGUFWriter(target, arch=_arch(reader))
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(7)
    for tensor in reader.tensors:
        if not tensor.name.endswith("ffn_down.weight"):
            continue
        n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])  # ggml order: the input size first
        if misshapen:
            n_in, n_out = n_out, n_in
        writer.add_tensor(tensor.name + ".lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
        writer.add_tensor(tensor.name + ".lora_b", rng.normal(0, std, (n_out, rank)).astype(np.float32))
    _finish(writer)
    return target


def unknown_architecture(target: Path) -> Path:
    """A well-formed GGUF whose ``general.architecture`` llama.cpp has never heard of."""
    import gguf

    writer = gguf.GGUFWriter(target, arch="corralnet")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    _finish(writer)
    return target


def _finish(writer: object) -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]
