"""corral.modelstore.gguf_meta reads a GGUF header with struct, not the gguf package's reader: it must read every value
the way that reader does, in either byte order, and refuse what is broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corral.modelstore.gguf_meta import VOCAB_SIZE_KEY, read_gguf_metadata, read_header
from tests.ggufs import with_metadata


def write_sample(target: Path, *, big_endian: bool = False) -> Path:
    """A GGUF with a value of every type, arrays of numbers, strings and arrays, and two tensors."""
    import gguf

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(target, arch="llama", endianess=endian)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -3000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo\nworld")
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e300)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ü", ""])
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((3, 5, 2), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def reference(path: Path) -> tuple[dict, int, int]:
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return kv, sum(int(t.n_elements) for t in reader.tensors), reader.data_offset


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_every_value_reads_as_the_gguf_package_reads_it(tmp_path: Path, big_endian: bool) -> None:
    path = write_sample(tmp_path / "sample.gguf", big_endian=big_endian)
    kv, parameters, data_offset = reference(path)
    header = read_header(path)
    assert list(header.kv) == list(kv)
    for key, value in kv.items():
        assert header.kv[key] == pytest.approx(value) if isinstance(value, float) else header.kv[key] == value, key
    assert header.kv["t.str"] == "héllo\nworld" and header.kv["t.u64"] == 2**63 + 5
    assert header.parameters == parameters == 4 * 8 + 3 * 5 * 2 and header.data_offset == data_offset


def test_without_arrays_only_the_vocabularys_length_is_kept(tmp_path: Path) -> None:
    kv, parameters = read_gguf_metadata(write_sample(tmp_path / "sample.gguf"))
    assert kv["tokenizer.ggml.tokens"] == [] and kv["t.ints"] == [] and kv[VOCAB_SIZE_KEY] == 4
    assert kv["t.str"] == "héllo\nworld" and parameters == 62


@pytest.mark.parametrize("cut", [3, 20, 200, -1])
def test_a_truncated_or_foreign_file_is_a_value_error(tmp_path: Path, cut: int) -> None:
    data = write_sample(tmp_path / "sample.gguf").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGML" + data[4:] if cut == -1 else data[:cut])
    with pytest.raises(ValueError):
        read_header(broken)


def test_an_array_longer_than_the_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    data = bytearray(write_sample(tmp_path / "sample.gguf").read_bytes())
    at = data.index(b"t.ints") + len(b"t.ints") + 8  # past the key and the value type (array) and element type
    data[at : at + 8] = (2**60).to_bytes(8, "little")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        read_header(broken)


def test_with_metadata_changes_and_adds_keys_and_keeps_the_tensors(tmp_path: Path) -> None:
    import gguf

    source = write_sample(tmp_path / "sample.gguf")
    copy = with_metadata(source, tmp_path / "copy.gguf", {"t.str": "changed", "added.id": 7})
    kv, parameters, _ = reference(copy)
    assert kv["t.str"] == "changed" and kv["added.id"] == 7 and kv["t.i8"] == -5 and parameters == 62
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(copy)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(before.tensors, after.tensors, strict=True))
