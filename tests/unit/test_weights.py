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
    ],
)
def test_choose_weights(mode: str, file_type: str, on_cpu: bool, parallel: int, embedding: bool, expected: str) -> None:
    got = choose_weights(mode, file_type, on_cpu=on_cpu, parallel=parallel, embedding=embedding)  # type: ignore[arg-type]
    assert got == expected


def test_the_copy_lives_under_the_store_named_after_its_blob(tmp_path: Path) -> None:
    blob = tmp_path / "blobs" / "sha256-abc"
    assert derived_path(blob, "q8_0") == tmp_path / "derived" / "sha256-abc.q8_0.gguf"
