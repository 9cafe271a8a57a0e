"""Which weights a worker decodes with (workers/weights.py): a Q8_0 copy only where it makes batches faster."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.weights import choose_weights, derived_path


@pytest.mark.parametrize(
    ("mode", "file_type", "on_cpu", "parallel", "embedding", "expected"),
    [
        ("auto", "Q4_1", True, 0, False, "q8_0"),  # the default chat model on a CPU worker with auto slots
        ("auto", "Q5_1", True, 8, False, "q8_0"),
        ("auto", "Q4_1", True, 1, False, "native"),  # one slot: no batch to speed up, memory not worth it
        ("auto", "Q4_1", False, 0, False, "native"),  # GPU offload: the GPU kernels batch every type
        ("auto", "Q4_1", True, 0, True, "native"),  # embedding loads pack inputs, not sequences
        ("auto", "Q4_K", True, 0, False, "native"),  # not measured faster: left alone
        ("auto", "Q8_0", True, 0, False, "native"),
        ("native", "Q4_1", True, 0, False, "native"),
        ("q8_0", "Q4_K", True, 1, False, "q8_0"),  # asked for: any type below 8 bits
        ("q8_0", "Q4_1", True, 0, True, "q8_0"),
        ("q8_0", "F16", True, 0, False, "native"),  # never lose precision
        ("q8_0", "unknown", True, 0, False, "native"),
        ("q8_0", "Q4_1", False, 0, False, "native"),
        ("bf16", "F16", True, 0, False, "bf16"),  # asked for: any wide float model
        ("bf16", "F32", True, 0, True, "bf16"),
        ("bf16", "Q4_1", True, 0, False, "native"),  # a quantized model's copy would only grow
        ("bf16", "F16", False, 0, True, "native"),
    ],
)
def test_choose_weights(mode: str, file_type: str, on_cpu: bool, parallel: int, embedding: bool, expected: str) -> None:
    got = choose_weights(mode, file_type, on_cpu=on_cpu, parallel=parallel, embedding=embedding)  # type: ignore[arg-type]
    assert got == expected


@pytest.mark.parametrize(
    ("mode", "file_type", "embedding", "rank", "bf16", "expected"),
    [
        ("auto", "F16", True, False, True, "bf16"),  # an F16 embedding model where AVX512-BF16 kernels run
        ("auto", "F16", True, False, False, "native"),  # no such kernels: BF16 is slower than F16 there
        ("auto", "F16", True, True, True, "native"),  # rerank loads keep their own weights
        ("auto", "F32", True, False, True, "native"),  # measured on F16 models only
        ("auto", "Q8_0", True, False, True, "native"),
        ("auto", "F16", False, False, True, "native"),  # chat: not measured
        ("q8_0", "F16", True, False, True, "q8_0"),  # asked for
        ("native", "F16", True, False, True, "native"),
    ],
)
def test_auto_embeds_f16_models_from_bf16_where_the_kernels_have_it(
    mode: str, file_type: str, embedding: bool, rank: bool, bf16: bool, expected: str,
) -> None:
    got = choose_weights(mode, file_type, on_cpu=True, parallel=0, embedding=embedding, rank=rank, bf16=bf16)  # type: ignore[arg-type]
    assert got == expected


@pytest.mark.parametrize(
    ("mode", "file_type", "rank", "bf16", "expected"),
    [
        ("auto", "F16", False, True, "q8_0"),  # AMX kernels (with AVX512-BF16 beside them): the Q8_0 copy, 1.4x
        ("auto", "F16", False, False, "q8_0"),
        ("auto", "F16", True, True, "native"),  # rerank loads keep their own weights
        ("auto", "Q8_0", False, True, "native"),  # already Q8_0
        ("bf16", "F16", False, True, "bf16"),  # asked for
        ("native", "F16", False, True, "native"),
    ],
)
def test_auto_embeds_f16_models_from_q8_0_where_the_kernels_have_amx(
    mode: str, file_type: str, rank: bool, bf16: bool, expected: str,
) -> None:
    got = choose_weights(mode, file_type, on_cpu=True, parallel=0, embedding=True, rank=rank, bf16=bf16, amx=True)  # type: ignore[arg-type]
    assert got == expected
    assert choose_weights(mode, file_type, on_cpu=False, parallel=0, embedding=True, amx=True) == "native"  # type: ignore[arg-type]


def test_the_copy_lives_under_the_store_named_after_its_blob(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "sha256-abc"
    assert derived_path(blob, "q8_0") == tmp_path / "derived" / "sha256-abc.q8_0.gguf"
