"""A BERT cross-encoder GGUF (a reranker) written with the ``gguf`` package from seeded random weights: the rerank
tests' fixture (tests/ggufs.py re-exports it; tests/rerank_reference.py computes the same network in numpy) and
the rerank bench's realistic-size model (bench/rerank.py), which may not import the tests.  No reranker can be
had offline, and random weights score at the speed of real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
