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


# The words of the rerank tests' queries and documents, each one WordPiece token of the cross-encoder fixture
# (other text still tokenizes: letters, digits and punctuation are tokens too, at the start of a word and inside).
RERANK_WORDS = (
    "the of and to in is was for on that with as by at from it an are which this be has had not what where who "
    "how when why do does can a capital city country france paris germany berlin italy rome spain madrid river "
    "ocean mountain flows into sea north south east west largest small big population people live many million "
    "tower eiffel built year famous museum art music food wine bread cheese train station airport weather rain "
    "sun winter summer cold hot football game team player won cup world history war king queen language spoken "
    "french german english book read write computer program code python model data search query document "
    "answer question relevant score rank sentence text word token sep cls"
).split()
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4


def wordpiece_vocab(words: list[str]) -> tuple[list[str], list[int]]:
    """A WordPiece vocabulary in llama.cpp's "phantom space" form (a word start is prefixed with U+2581, a
    continuation piece is bare): the specials, ``words``, then every ASCII letter, digit and punctuation mark
    both as a word start and as a continuation, so any ASCII text tokenizes without [UNK]."""
    import string

    import gguf

    tokens = list(SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * len(tokens)
    seen = set(tokens)
    singles = string.ascii_lowercase + string.digits
    pieces = ["\u2581" + w for w in words] + ["\u2581" + c for c in singles + string.punctuation] + list(singles)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def cross_encoder(
    target: Path, *, seed: int = 5, n_embd: int = 32, n_ff: int = 64, n_layer: int = 2, n_head: int = 4,
    n_ctx: int = 128, words: list[str] | None = None, rerank_template: str | None = None, f16: bool = False,
) -> Path:
    """A BERT cross-encoder (``BertForSequenceClassification`` as llama.cpp's converter writes it, plus
    ``pooling_type`` RANK) with seeded random weights: the ``cls`` dense + tanh and ``cls.output`` head give one
    score per (query, document) pair.  Defaults: 2 layers of width 32 over a vocabulary of a few hundred tokens
    (:data:`RERANK_WORDS`), about 100 KB.  ``rerank_template`` (with ``{query}`` and ``{document}``) is written
    as the GGUF's ``rerank`` chat template; ``f16`` stores the matrices as f16 (the benches' bigger model).
    tests/rerank_reference.py computes the same network from the file in numpy."""
    import gguf

    tokens, types = wordpiece_vocab(words if words is not None else RERANK_WORDS)
    writer = gguf.GGUFWriter(target, arch="bert")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("corral-test-cross-encoder")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_token_type_count(2)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_bos_token_id(2)  # [CLS]
    writer.add_eos_token_id(3)  # [SEP]
    writer.add_sep_token_id(3)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_add_sep_token(False)
    if rerank_template is not None:
        writer.add_chat_template([{"name": "rerank", "template": rerank_template}])
    rng = np.random.default_rng(seed)

    def matrix(n_out: int, n_in: int, scale: float = 1.0) -> np.ndarray:
        data = rng.normal(0, scale / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
        return data.astype(np.float16) if f16 else data

    def vector(n: int, around: float = 0.0, std: float = 0.1) -> np.ndarray:
        return (around + rng.normal(0, std, n)).astype(np.float32)

    def norm(name: str) -> None:  # LayerNorm weights near 1 and biases near 0, not exactly: both must be applied
        writer.add_tensor(f"{name}.weight", vector(n_embd, 1.0))
        writer.add_tensor(f"{name}.bias", vector(n_embd))

    writer.add_tensor("token_embd.weight", rng.normal(0, 1, (len(tokens), n_embd)).astype(np.float32))
    writer.add_tensor("token_types.weight", rng.normal(0, 0.5, (2, n_embd)).astype(np.float32))
    writer.add_tensor("position_embd.weight", rng.normal(0, 0.5, (n_ctx, n_embd)).astype(np.float32))
    norm("token_embd_norm")
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            # sharp attention (large q and k), so that what a document says moves the [CLS] row and its score
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(n_embd, n_embd, 3.0 if name in ("attn_q", "attn_k") else 1.0))
            writer.add_tensor(f"blk.{i}.{name}.bias", vector(n_embd))
        norm(f"blk.{i}.attn_output_norm")
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.bias", vector(n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.bias", vector(n_embd))
        norm(f"blk.{i}.layer_output_norm")
    writer.add_tensor("cls.weight", matrix(n_embd, n_embd))
    writer.add_tensor("cls.bias", vector(n_embd))
    writer.add_tensor("cls.output.weight", rng.normal(0, 2 / np.sqrt(n_embd), (1, n_embd)).astype(np.float32))
    writer.add_tensor("cls.output.bias", vector(1))
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
