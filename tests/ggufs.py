"""GGUF files the tests make with the ``gguf`` package: a LoRA adapter for SmolLM2 (a working one, and one whose
shapes fit no model), a GGUF of an architecture llama.cpp does not know, a vision projector (``mmproj``) for
SmolLM2, and a BERT cross-encoder (a reranker); a copy of a GGUF with metadata changed; and PNG images to show
the projector."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np

from corral.modelstore.gguf_meta import GGUF_MAGIC, read_header
from harness.cross_encoder import RERANK_WORDS, SPECIAL_TOKENS, cross_encoder, wordpiece_vocab

__all__ = ["RERANK_WORDS", "SPECIAL_TOKENS", "cross_encoder", "wordpiece_vocab"]


def with_metadata(source: Path, target: Path, updates: dict[str, str | int]) -> Path:
    """A copy of ``source`` with metadata keys set or added (a ``str`` as a string, an ``int`` as a uint32), its
    tensors untouched.  The ``gguf`` package's ``copy_with_new_metadata`` rebuilds every field in numpy: ~10 s
    for SmolLM2, against a fraction of a second here."""
    header = read_header(source, with_arrays=False)
    order = header.byteorder

    def encoded(key: str, value: str | int) -> bytes:
        name = key.encode()
        head = struct.pack(f"{order}Q", len(name)) + name
        if isinstance(value, str):
            text = value.encode()
            return head + struct.pack(f"{order}IQ", 8, len(text)) + text
        return head + struct.pack(f"{order}II", 4, value)

    with open(source, "rb") as src, open(target, "wb") as out:
        raw = src.read(header.data_offset)
        keys = [*header.spans, *(k for k in updates if k not in header.spans)]
        out.write(GGUF_MAGIC + struct.pack(f"{order}IQQ", header.version, len(header.tensors), len(keys)))
        for key in keys:
            out.write(encoded(key, updates[key]) if key in updates else raw[slice(*header.spans[key])])
        out.write(raw[slice(*header.tensor_info)])
        alignment = int(header.kv.get("general.alignment", 32))
        out.write(b"\0" * (-out.tell() % alignment))
        src.seek(header.data_offset)
        shutil.copyfileobj(src, out, 1 << 22)
    return target


def lora_adapter(base: Path, target: Path, *, rank: int = 4, std: float = 0.2, misshapen: bool = False) -> Path:
    """A LoRA adapter on every ``ffn_down`` of ``base`` with random A and B (seeded), strong enough to change
    greedy output; ``misshapen`` swaps the input and output sizes, which llama.cpp must refuse."""
    import gguf

    header = read_header(base, with_arrays=False)
    writer = gguf.GGUFWriter(target, arch=header.kv["general.architecture"])
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(7)
    for name, shape in header.tensors:
        if not name.endswith("ffn_down.weight"):
            continue
        n_in, n_out = shape[0], shape[1]  # ggml order: the input size first
        if misshapen:
            n_in, n_out = n_out, n_in
        writer.add_tensor(name + ".lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
        writer.add_tensor(name + ".lora_b", rng.normal(0, std, (n_out, rank)).astype(np.float32))
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


def vision_projector(target: Path, *, n_embd_text: int = 576, seed: int = 11, std: float = 0.5) -> Path:
    """A LLaVA-style projector (``clip.projector_type`` ``mlp``) with random weights (seeded) for a text model of
    ``n_embd_text`` (SmolLM2-135M: 576): a 2-layer ViT over 28x28 images in 14x14 patches, then a 2-layer MLP
    into the text model's embedding space.  Each image becomes 4 embeddings, different for different images,
    strong enough to change what the model says.  No real vision model is available offline: this one sees
    without understanding, which is all a test of the plumbing needs."""
    import gguf

    writer = gguf.GGUFWriter(target, arch="clip")
    writer.add_type("mmproj")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    dim, ff, hidden, layers, size, patch = 32, 64, 64, 2, 28, 14
    writer.add_vision_image_size(size)
    writer.add_vision_patch_size(patch)
    writer.add_vision_embedding_length(dim)
    writer.add_vision_feed_forward_length(ff)
    writer.add_vision_block_count(layers)
    writer.add_vision_head_count(2)
    writer.add_vision_projection_dim(n_embd_text)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return rng.normal(0, std, shape).astype(np.float32)

    ones, zeros = np.ones(dim, np.float32), np.zeros(dim, np.float32)
    writer.add_tensor("v.patch_embd.weight", weights(dim, 3, patch, patch).astype(np.float16))
    writer.add_tensor("v.class_embd", weights(dim))
    writer.add_tensor("v.position_embd.weight", weights((size // patch) ** 2 + 1, dim))
    writer.add_tensor("v.pre_ln.weight", ones)
    writer.add_tensor("v.pre_ln.bias", zeros)
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", weights(dim, dim))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", weights(dim))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", ones)
            writer.add_tensor(f"v.blk.{i}.{name}.bias", zeros)
        writer.add_tensor(f"v.blk.{i}.ffn_up.weight", weights(ff, dim))
        writer.add_tensor(f"v.blk.{i}.ffn_up.bias", weights(ff))
        writer.add_tensor(f"v.blk.{i}.ffn_down.weight", weights(dim, ff))
        writer.add_tensor(f"v.blk.{i}.ffn_down.bias", weights(dim))
    writer.add_tensor("mm.0.weight", weights(hidden, dim))
    writer.add_tensor("mm.0.bias", weights(hidden))
    writer.add_tensor("mm.2.weight", weights(n_embd_text, hidden))
    writer.add_tensor("mm.2.bias", weights(n_embd_text))
    _finish(writer)
    return target


def png(rgb: np.ndarray) -> bytes:
    """A PNG of an (height, width, 3) uint8 array, written with zlib (no imaging library needed)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _finish(writer: object) -> None:
    writer.write_header_to_file()  # type: ignore[attr-defined]
    writer.write_kv_data_to_file()  # type: ignore[attr-defined]
    writer.write_tensors_to_file()  # type: ignore[attr-defined]
    writer.close()  # type: ignore[attr-defined]
