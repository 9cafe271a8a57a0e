"""Which weights a CPU worker decodes with: the model's own, or a Q8_0 or BF16 copy made once beside the store.

On the CPU, llama.cpp multiplies a batch of many sequences' tokens by Q8_0 (and F16, Q4_0) weights with tiled
kernels (llamafile's tinyBLAS) that load each weight block once for the whole batch; for Q4_1 and Q5_1 it has
no such kernel and runs one dot product per weight row per token, so a decode step costs almost linearly more
with every sequence in it.  Continuous batching (workers/decode_loop.py) lives on that step, so for those two
types a CPU worker with several slots decodes from a Q8_0 copy of the weights instead.  Measured on the
project's 2-core VM with SmolLM2-135M (bench/cpu_weights.py): a step of 8 sequences 25.0 -> 18.0 ms, prompt
prefill 2.4 -> 1.6 ms per token, one sequence unchanged (6.0 vs 6.1 ms).

Q8_0 has 255 levels per block of 32 against Q4_1's 16 and Q5_1's 32, so the copy stays close to the
weights; measured, it is as faithful to them as the native kernels are (which round activations to 8 bits):
against an F16 dequantization of SmolLM2's Q4_1 weights, the Q8_0 copy and the native Q4_1 kernels have a
mean next-token KL of 0.0043 and 0.0048 and pick its next token 96.3% and 96.7% of the time.  Greedy
outputs can still part from a native Q4_1 run after some tokens (as they can between llama.cpp backends);
``CORRAL_CPU_WEIGHTS=native`` keeps the model's own weights.  The copy costs disk and memory (Q8_0 is 8.5
bits per weight against Q4_1's 5), which is why ``auto`` leaves one-slot workers and other types alone.

Embedding loads keep their own weights under ``auto``; ``q8_0`` also gives F16 embedding models a copy (issue
#39's precision lever: embedding is all prefill, where Q8_0 kernels might beat F16).  On the 2-core AVX2 VM
(AMD EPYC family 25, no AVX-512) the copy is slower: a 3,000-chunk all-minilm embed job end to end ran at 45.8
and 42.3 chunks/s against F16's 58.0 and 57.2 (bench/embed_onnx.py, alternating, load average 2.0-2.7), and
corral's packer in process showed no gain (17.1 and 7.6 against 17.0 and 7.4, at load 4-5).  Fidelity is fine:
the minimum cosine to sentence-transformers over tests/fixtures/minilm_reference.json is 0.9990 (mean 0.9996)
against F16's 1.0000; keeping token_embd in F16 (``token_embedding_type``) changes nothing (0.9988); Q4_0 fails
(0.925).  The copy's vectors also depend on the batch they are packed in (one input alone against packed with
others: cosine down to 0.99956, against 0.9999994 for F16), below the 1e-5 that
tests/integration/test_embeddings.py holds packed and alone to.  So the copy stays opt-in, for CPUs where
llama.cpp's Q8_0 kernels are measured faster.

BF16 is the embedding lever that works, on CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and
Sapphire Rapids) and a worker loading a build with those kernels (corral/cpu_kernels.py: an embedding-only
worker on such a CPU): ggml multiplies BF16 by BF16
with ``vdpbf16ps``, two products per float32 lane, where F16 weights are widened to float32 first.  Measured on
the 2-core AVX-512 VM (AMD EPYC, Zen 4 flags) with corral's packer in process, 2,000 chunks of ~64 tokens:
F16 154 chunks/s, BF16 copy 216, Q8_0 copy 138; on the AVX2 build of the same machine F16 113, BF16 83 (no such
kernel: slower).  BF16 keeps sentence-transformers' fidelity (minimum cosine 1.0000, mean 0.99999, over
tests/fixtures/minilm_reference.json); one input alone and packed with others agree to 1.3e-5 in cosine (F16:
5e-7).  So ``auto`` embeds F16 models from a BF16 copy where the loaded kernels have AVX512-BF16
(:func:`bf16_kernels`), and from their own weights elsewhere; rerank loads keep their own weights (a score, not
a direction, is what they return).

AMX changes the order on Intel CPUs that have it (Sapphire Rapids and later), where an embedding-only worker loads
the AMX build that passed its check at install (corral/cpu_kernels.py): ggml multiplies Q8_0 weights on the AMX
tiles, 16x64 int8 products per instruction, and has no AMX kernel for F16 or BF16.  Measured on the project's
2-core Intel Xeon VM (AMX, AVX512-BF16 and -FP16), corral's packer in process, 2,000 chunks of ~64 tokens,
2 threads, three runs each: Q8_0 copy on the AMX build 145 chunks/s; F16 102-110 on the AMX build and 91-94 on
the zen4 one; BF16 85-91 on either (slower than F16 on this CPU, unlike Zen 4); ONNX Runtime int8 in the same
sitting 132-135.  So ``auto`` embeds F16 models from a Q8_0 copy where the loaded kernels have AMX
(:func:`amx_kernels`).  Its fidelity is the Q8_0 copy's: minimum cosine 0.9988 to sentence-transformers over
tests/fixtures/minilm_reference.json (mean 0.9996); one input alone and packed with others agree to 5e-4 in
cosine (0.99951), as on the non-AMX Q8_0 kernels, against 1.3e-5 for BF16.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
from pathlib import Path

from corral.cpu_kernels import amx_permitted, compiled_features
from corral.errors import GenerationFailed
from corral.settings import CpuWeights

log = logging.getLogger(__name__)

# File types (the store's config "file_type") with no batched CPU matmul kernel in llama.cpp, where a Q8_0
# copy is measured to be faster from two sequences per step on.
AUTO_TYPES = frozenset({"Q4_1", "Q5_1"})
# File types a forced q8_0 leaves alone: already Q8_0, or wider (a Q8_0 copy would lose precision), but for
# embedding loads of EMBEDDING_COPY_TYPES, whose copy is measured faithful.
KEEP_TYPES = frozenset({"Q8_0", "F16", "BF16", "F32", "unknown"})
# File types of embedding models that a forced q8_0 copies too: all-minilm's Q8_0 copy is measured at
# sentence-transformers fidelity, but not faster on the AVX2 VM, so ``auto`` leaves them alone (module docstring).
EMBEDDING_COPY_TYPES = frozenset({"F16"})
# File types a forced bf16 copies: the wide float ones (a quantized model's copy would only grow).
BF16_COPY_TYPES = frozenset({"F16", "F32"})
# llama.cpp file types of the copies.
COPY_FTYPES = {"q8_0": 7, "bf16": 32}  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_BF16


def _loaded_features() -> set[str]:
    import llama_cpp  # deferred: CUDA_VISIBLE_DEVICES must be set before this import

    return compiled_features(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


@functools.cache
def bf16_kernels() -> bool:
    """Whether the llama.cpp this process loads multiplies BF16 with AVX512-BF16 instructions."""
    return "AVX512_BF16" in _loaded_features()


@functools.cache
def amx_kernels() -> bool:
    """Whether the llama.cpp this process loads multiplies Q8_0 weights on AMX tiles (an embedding-only worker
    on a CPU whose AMX build passed its check at install: corral/cpu_kernels.py), Linux permitting."""
    return "AMX_INT8" in _loaded_features() and amx_permitted()


def choose_weights(mode: CpuWeights, file_type: str, *, on_cpu: bool, parallel: int, embedding: bool,
                   rank: bool = False, bf16: bool = False, amx: bool = False) -> str:
    """``"q8_0"`` or ``"bf16"`` when this load should decode from such a copy, else ``"native"``.

    ``parallel`` is the configured slot count (0 = auto, which means several slots for any model that fits).
    ``embedding`` loads (``rank`` marks a rerank load among them) of :data:`EMBEDDING_COPY_TYPES` get under
    ``auto`` a Q8_0 copy where ``amx`` (the loaded kernels multiply it on AMX tiles: :func:`amx_kernels`), else a
    BF16 copy where ``bf16`` (AVX512-BF16 kernels: :func:`bf16_kernels`), and keep their own weights otherwise; a
    forced ``q8_0`` copies those as well as every type below 8 bits.
    """
    if not on_cpu or mode == "native":
        return "native"
    if mode == "bf16":
        return "bf16" if file_type in BF16_COPY_TYPES else "native"
    if embedding and file_type in EMBEDDING_COPY_TYPES:
        if mode == "q8_0" or (amx and not rank):
            return "q8_0"
        if bf16 and not rank:
            return "bf16"
    if file_type in KEEP_TYPES:
        return "native"
    if mode == "q8_0":
        return "q8_0"
    if embedding or parallel == 1 or file_type not in AUTO_TYPES:
        return "native"
    return "q8_0"


def derived_path(source: Path, weights: str) -> Path:
    """Where the copy of a store blob lives: ``<store>/derived/<blob name>.<weights>.gguf``.

    The name starts with the blob's digest, so the store prunes it together with its blob.
    """
    return source.parent.parent / "derived" / f"{source.name}.{weights}.gguf"


def prepare(source: Path, weights: str, *, threads: int) -> Path:
    """The GGUF to load for ``weights``: ``source`` itself, or its Q8_0 or BF16 copy, made on first use.

    Made into a temporary file and renamed into place, so workers sharing a store never load a half-written
    copy (two that race both quantize; the second rename wins with identical bytes).
    """
    if weights == "native":
        return source
    if weights not in COPY_FTYPES:
        raise ValueError(f"unknown weights {weights!r}")
    target = derived_path(source, weights)
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only or full store: slower batches, but the model still serves
        log.warning("cannot write a %s copy of %s (%s); decoding its own weights", weights.upper(), source.name, exc)
        return source
    os.close(fd)
    try:
        quantize(source, Path(tmp_name), COPY_FTYPES[weights], threads=threads)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    log.info("made %s (%s weights for CPU decoding)", target, weights.upper())
    return target


def quantize(source: Path, target: Path, ftype: int, *, threads: int) -> None:
    """Write ``source``'s weights as llama.cpp file type ``ftype`` (requantizing quantized ones) to ``target``."""
    import llama_cpp  # deferred: CUDA_VISIBLE_DEVICES must be set before this import

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = max(1, threads)
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise GenerationFailed(f"failed to requantize {source.name} (llama_model_quantize returned {rc})")
