"""The kernel level make install builds for a CPU (corral/cpu_kernels.py), and the worker's refusal of a library
built for instructions its CPU lacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from corral import cpu_kernels
from corral.cpu_kernels import KernelMismatch, check_loaded, choose, compiled_features, cpu_flags

ROOT = Path(__file__).resolve().parents[2]

# /proc/cpuinfo flags of machines this project has run on (abridged to what matters, plus noise).
ZEN3 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2 vaes aes"
ZEN4 = (ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vnni avx512_bf16 "
        "avx_vnni avx512_vpopcntdq")
SAPPHIRE = ZEN4 + " amx_tile amx_int8 amx_bf16"
ALDERLAKE = ZEN3 + " avx_vnni"
SKYLAKE = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl"
SYSTEM_INFO_AVX2 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 "
                    "| OPENMP = 1 | REPACK = 1 | ")
SYSTEM_INFO_ZEN4 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


@pytest.mark.parametrize(("flags", "expected"), [
    (ZEN3, "haswell"), (ZEN4, "zen4"), (ALDERLAKE, "alderlake"), (SKYLAKE, "skylakex"),
    (SAPPHIRE, "sapphirerapids"),  # AMX: make install keeps it only where its kernel check passes
    ("fpu sse sse2 sse4_2", "sse42"), ("fpu sse sse2", "x64"),
])
def test_the_best_level_the_cpu_has(flags: str, expected: str) -> None:
    assert choose(flags.split()).name == expected


def test_amx_can_be_left_out_and_a_level_can_be_named() -> None:
    assert choose(SAPPHIRE.split(), allow_amx=False).name == "zen4"
    assert choose(ZEN4.split(), allow_amx=True).name == "zen4"  # no AMX on the CPU: not picked even if allowed
    assert choose(ZEN4.split(), override="haswell").name == "haswell"
    with pytest.raises(ValueError, match="CORRAL_CPU_VARIANT='nehalem' is not one of"):
        choose(ZEN4.split(), override="nehalem")


def test_cmake_args_switch_every_feature_explicitly() -> None:
    args = choose(ZEN4.split()).cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512_BF16=ON" in args and "-DGGML_AMX_INT8=OFF" in args
    haswell = choose(ZEN3.split()).cmake_args()
    assert "-DGGML_AVX2=ON" in haswell and "-DGGML_AVX512=OFF" in haswell


def test_cpuinfo_parse() -> None:
    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 bmi2\n\nprocessor\t: 1\nflags\t\t: fpu\n") == {
        "fpu", "avx2", "bmi2"}
    assert cpu_flags("no flags line\n") == set()


def test_the_loaded_library_is_described_by_what_it_reports() -> None:
    assert compiled_features(SYSTEM_INFO_ZEN4) >= {"AVX512", "AVX512_BF16", "AVX2"}
    assert check_loaded(SYSTEM_INFO_AVX2, set(ZEN4.split()))["variant"] == "haswell"  # runs on a newer CPU
    assert check_loaded(SYSTEM_INFO_ZEN4, set(ZEN4.split()))["variant"] == "zen4"


@pytest.mark.skipif(not cpu_kernels.is_x86_64(), reason="x86-64 kernel levels")
def test_a_library_built_for_a_newer_cpu_is_refused_with_the_fix() -> None:
    with pytest.raises(KernelMismatch) as caught:
        check_loaded(SYSTEM_INFO_ZEN4, set(ZEN3.split()))
    message = str(caught.value)
    assert "zen4" in message and "avx512f" in message and "make install" in message and "haswell" in message


@pytest.mark.skipif(not cpu_kernels.is_x86_64(), reason="x86-64 kernel levels")
def test_make_reads_the_level_from_the_script_with_the_system_python() -> None:
    """make install runs the module as a script before the venv exists: standard library only."""
    out = subprocess.run([sys.executable, "-I", str(ROOT / "corral" / "cpu_kernels.py"), "cmake-args"],
                         capture_output=True, text=True, check=True, env={"CORRAL_CPU_VARIANT": "haswell"})
    assert out.stdout.split() == choose([], override="haswell").cmake_args()
    bad = subprocess.run([sys.executable, "-I", str(ROOT / "corral" / "cpu_kernels.py"), "name"],
                         capture_output=True, text=True, env={"CORRAL_CPU_VARIANT": "nehalem"})
    assert bad.returncode == 2 and "is not one of" in bad.stderr


def test_generation_runs_the_best_level_without_avx512() -> None:
    """AVX-512's tinyBLAS tiling loses at 8 sequences (corral/cpu_kernels.py): chat keeps the AVX2 level."""
    zen4 = choose(ZEN4.split())
    assert cpu_kernels.generation_level(zen4.flags(), zen4).name == "haswell"
    haswell = choose(ZEN3.split())
    assert cpu_kernels.generation_level(haswell.flags(), haswell) is haswell
    alder = choose(ALDERLAKE.split())
    assert cpu_kernels.generation_level(alder.flags(), alder) is alder  # no AVX-512: one level for both


def test_the_best_levels_libraries_are_unpacked_beside_the_package(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llama_cpp/lib/libllama.so", b"elf")
        archive.writestr("llama_cpp/lib/libggml-cpu.so", b"elf")
        archive.writestr("llama_cpp/llama.py", b"code")
    cpu_kernels.extract_libraries(wheel, tmp_path / "prefix" / "lib" / "corral-kernels" / "zen4")
    assert sorted(p.name for p in (tmp_path / "prefix" / "lib" / "corral-kernels" / "zen4").iterdir()) == [
        "libggml-cpu.so", "libllama.so"]


def test_the_fallback_for_a_failed_amx_check_is_the_best_level_without_amx() -> None:
    sapphire = choose(SAPPHIRE.split())
    assert cpu_kernels.without_amx(sapphire).name == "zen4"
    zen4 = choose(ZEN4.split())
    assert cpu_kernels.without_amx(zen4) is zen4
    assert cpu_kernels.generation_level(sapphire.flags(), sapphire).name == "haswell"  # chat: neither


@pytest.mark.skipif(not cpu_kernels.is_x86_64(), reason="x86-64 kernel levels")
def test_make_reads_the_amx_switch_and_the_fallback_from_the_script() -> None:
    script = [sys.executable, "-I", str(ROOT / "corral" / "cpu_kernels.py")]
    named = {"CORRAL_CPU_VARIANT": "sapphirerapids"}
    out = subprocess.run([*script, "fallback-name"], capture_output=True, text=True, check=True, env=named)
    assert out.stdout.strip() == "zen4"
    out = subprocess.run([*script, "cmake-args"], capture_output=True, text=True, check=True, env=named)
    assert "-DGGML_AMX_INT8=ON" in out.stdout.split()
    assert cpu_kernels.amx_allowed({}) and cpu_kernels.amx_allowed({"CORRAL_CPU_AMX": "1"})
    assert not cpu_kernels.amx_allowed({"CORRAL_CPU_AMX": "0"}) and not cpu_kernels.amx_allowed({"CORRAL_CPU_AMX": "Off"})


def _sdist(where: Path, mmq: str) -> None:
    import io
    import tarfile

    with tarfile.open(where / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as archive:
        data = mmq.encode()
        info = tarfile.TarInfo("llama_cpp_python-0.3.36/" + str(cpu_kernels.AMX_SOURCE))
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))


def test_the_amx_tile_configuration_is_moved_to_static_storage(tmp_path: Path) -> None:
    """ggml's config on the stack lost its stores to GCC and the first tileloadd raised SIGILL."""
    before = "inline void ggml_tile_config_init(void) {\n" + cpu_kernels.TILE_CONFIG_ON_STACK + "\n    done = true;\n}\n"
    _sdist(tmp_path, before)
    tree = cpu_kernels.patch_source(tmp_path)
    fixed = (tree / cpu_kernels.AMX_SOURCE).read_text()
    assert "static const tile_config_t tc" in fixed and "alignas(64) tile_config_t tc = {};" not in fixed
    assert fixed.count("c.rows[") == 8 and fixed.count("c.colsb[") == 8 and "c.palette_id = 1;" in fixed
    assert fixed.endswith("_tile_loadconfig(&tc);\n    done = true;\n}\n")
    assert cpu_kernels.patch_source(tmp_path).samefile(tree)  # unpacked again: patched again, the same


def test_a_source_without_the_known_tile_configuration_is_refused(tmp_path: Path) -> None:
    _sdist(tmp_path, "inline void ggml_tile_config_init(void) { /* another llama.cpp */ }\n")
    with pytest.raises(ValueError, match="not the code this fix knows"):
        cpu_kernels.patch_source(tmp_path)
    out = subprocess.run([sys.executable, "-I", str(ROOT / "corral" / "cpu_kernels.py"), "patch-source", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not the code this fix knows" in out.stderr
