"""Which of llama.cpp's x86-64 CPU kernel sets this machine gets, at build time and at run time.

ggml compiles its CPU kernels for one instruction-set level per build.  A build that stops at AVX2 leaves an
AVX-512 machine's VNNI and BF16 units idle (embedding is all prefill, so that is most of its speed); a build for
a newer level than the CPU has dies on its first illegal instruction.  ggml's own answer, one library per level
loaded at run time (``GGML_CPU_ALL_VARIANTS``), builds the CPU backend fourteen times, and llama-cpp-python 0.3
does not install those libraries.  corral picks instead: ``make install`` asks this module for the best level
this CPU supports (:func:`choose`) and builds that one, keyed by its name in corral's own wheel cache, so a wheel
is never handed to a CPU it was not built for.  A worker checks the kernels compiled into the library it
loaded against the CPU it runs on (:func:`check_loaded`): a venv or image moved to an older CPU gets a clear
error instead of SIGILL.

One level does not suit every workload on an AVX-512 CPU.  Embedding is all prefill and gains most from AVX-512
(VNNI, BF16); batched decoding of Q8_0 weights at 8 sequences loses: llamafile's tinyBLAS tiles differently with
AVX-512's 32 vector registers, and on the 2-core AVX-512 VM a step of 8 sequences took 23.6 ms against the AVX2
build's 18.8 (bench/cpu_weights.py; 8 chats at once: 187 against 249 tok/s).  So where the best level has
AVX-512, ``make install`` builds two: the *generation* level (:func:`generation_level`, the best without AVX-512)
is the installed package, which chat and mixed workers load; the best level's libraries go beside it
(:func:`side_libraries`), and a worker that serves only embedding and rerank models loads those
(``LLAMA_CPP_LIB_PATH``, workers/main.py).

The levels and their names are ggml's ``GGML_CPU_ALL_VARIANTS`` list (ggml/src/CMakeLists.txt), best first.
AMX (sapphirerapids) is the best level where the CPU has it, with two guards.  ggml's AMX kernels in
llama-cpp-python 0.3.36 stop on their first tile load with SIGILL (measured on the project's 2-core Intel Xeon VM
with AMX, gdb at ``tileloadd``): ``ggml_tile_config_init`` fills the tile configuration on the stack, and by the
upstream report (ggml-org/llama.cpp#26954) GCC drops those stores, so the tiles are never configured; with the
configuration in static storage the kernels run and agree with F16.  So that level is built from the sdist with
that fix (:func:`patch_source`), and ``make install`` keeps it only where ``workers/kernel_check.py`` passes on
this machine (its kernels run and agree with the F16 ones); otherwise it builds :func:`without_amx`'s level
instead.  ``CORRAL_CPU_AMX=0`` leaves AMX out.  ``CORRAL_CPU_VARIANT=<name>`` picks a level by hand (``haswell``
is the portable x86-64-v3 build of earlier releases; ``x64`` runs anywhere).

Standard library only: ``make install`` runs it with the system Python before the venv exists
(``python3 corral/cpu_kernels.py cmake-args``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ggml's feature switch (GGML_<name>=ON) -> the /proc/cpuinfo flags the kernels it enables execute.
FEATURE_FLAGS: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "F16C": ("f16c",),
    "FMA": ("fma",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_INT8": ("amx_int8",),
}
# The names llama_print_system_info() gives the compiled-in features (ggml-cpu.cpp), for those it reports.
REPORTED = ("AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
            "AVX512_BF16", "AMX_INT8")

_BASE = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
_512 = (*_BASE, "AVX512")


@dataclass(frozen=True)
class Variant:
    """One kernel level: ggml's name for it and the features it is built with."""

    name: str
    features: tuple[str, ...]

    def flags(self) -> set[str]:
        return {flag for feature in self.features for flag in FEATURE_FLAGS[feature]}

    def cmake_args(self) -> list[str]:
        args = ["-DGGML_NATIVE=OFF"]
        args += [f"-DGGML_{feature}={'ON' if feature in self.features else 'OFF'}" for feature in FEATURE_FLAGS]
        return args


VARIANTS: tuple[Variant, ...] = (
    Variant("sapphirerapids", (*_512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8")),
    Variant("zen4", (*_512, "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")),
    Variant("cooperlake", (*_512, "AVX512_VNNI", "AVX512_BF16")),
    Variant("icelake", (*_512, "AVX512_VBMI", "AVX512_VNNI")),
    Variant("cascadelake", (*_512, "AVX512_VNNI")),
    Variant("cannonlake", (*_512, "AVX512_VBMI")),
    Variant("skylakex", _512),
    Variant("alderlake", (*_BASE, "AVX_VNNI")),
    Variant("haswell", _BASE),
    Variant("piledriver", ("SSE42", "AVX", "F16C", "FMA")),
    Variant("ivybridge", ("SSE42", "AVX", "F16C")),
    Variant("sandybridge", ("SSE42", "AVX")),
    Variant("sse42", ("SSE42",)),
    Variant("x64", ()),
)
BY_NAME = {v.name: v for v in VARIANTS}
AMX_VARIANTS = frozenset({"sapphirerapids"})


AVX512_FEATURES = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8")


def generation_level(flags: Iterable[str], best: Variant) -> Variant:
    """The level generation runs at: ``best`` itself, or where that has AVX-512 the best level without it."""
    if "AVX512" not in best.features:
        return best
    dropped = {flag for feature in AVX512_FEATURES for flag in FEATURE_FLAGS[feature]}
    return choose(set(flags) - dropped)


def side_libraries(prefix: str | None = None) -> Path | None:
    """The best level's llama.cpp libraries, where ``make install`` put them beside a generation-level package
    (``<venv>/lib/corral-kernels/<level>``), or None."""
    root = Path(prefix or sys.prefix) / "lib" / "corral-kernels"
    best = choose_here()
    if best is None:
        return None
    # make install puts one level there: this CPU's best (or the one CORRAL_CPU_VARIANT named at build time)
    built = sorted(p.parent for p in root.glob("*/libllama.so"))
    named = root / best.name
    return named if named in built else (built[0] if len(built) == 1 else None)


class KernelMismatch(RuntimeError):
    """The loaded llama.cpp library was compiled for instructions this CPU does not have."""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this machine's first CPU (Linux's /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo = fh.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def is_x86_64() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64"}


def choose(flags: Iterable[str], *, override: str | None = None, allow_amx: bool = True) -> Variant:
    """The best level whose every instruction *flags* has (or the one *override* names)."""
    have = set(flags)
    if override:
        try:
            return BY_NAME[override]
        except KeyError:
            raise ValueError(f"CORRAL_CPU_VARIANT={override!r} is not one of: {', '.join(BY_NAME)}") from None
    for variant in VARIANTS:
        if variant.name in AMX_VARIANTS and not allow_amx:
            continue
        if variant.flags() <= have:
            return variant
    return BY_NAME["x64"]


def choose_here(env: dict[str, str] | None = None) -> Variant | None:
    """This machine's level under the environment's settings; None off x86-64 or where the CPU's flags cannot be
    read (not Linux): ggml's own defaults apply there."""
    env = dict(os.environ) if env is None else env
    flags = cpu_flags()
    override = env.get("CORRAL_CPU_VARIANT") or None
    if not is_x86_64() or not (flags or override):
        return None
    return choose(flags, override=override, allow_amx=amx_allowed(env))


def amx_allowed(env: dict[str, str]) -> bool:
    """``CORRAL_CPU_AMX``: AMX is a candidate level unless it says 0 (false, no, off)."""
    return env.get("CORRAL_CPU_AMX", "1").strip().lower() not in {"0", "false", "no", "off"}


def without_amx(best: Variant) -> Variant:
    """The level ``make install`` builds instead where ``best`` is the AMX level and its kernel check fails."""
    if best.name not in AMX_VARIANTS:
        return best
    return choose(best.flags() - {flag for f in ("AMX_TILE", "AMX_INT8") for flag in FEATURE_FLAGS[f]})


# ggml's AMX tile configuration, as llama-cpp-python 0.3.36 vendors it (ggml/src/ggml-cpu/amx/mmq.cpp), and the
# same configuration in static storage, which GCC keeps (module docstring).
AMX_SOURCE = Path("vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp")
_TILE_ROWS = """
    tc.rows[0] = 8;   tc.colsb[0] = 64;
    tc.rows[1] = 8;   tc.colsb[1] = 64;
    tc.rows[2] = 16;  tc.colsb[2] = 32;
    tc.rows[3] = 16;  tc.colsb[3] = 32;
    tc.rows[4] = 16;  tc.colsb[4] = 64;
    tc.rows[5] = 16;  tc.colsb[5] = 64;
    tc.rows[6] = 16;  tc.colsb[6] = 64;
    tc.rows[7] = 16;  tc.colsb[7] = 64;
"""
TILE_CONFIG_ON_STACK = ("    alignas(64) tile_config_t tc = {};\n    tc.palette_id = 1;\n    tc.start_row = 0;"
                        + _TILE_ROWS + "\n    _tile_loadconfig(&tc);")
TILE_CONFIG_STATIC = (
    "    // corral (corral/cpu_kernels.py): in static storage; on the stack GCC dropped these stores and ldtilecfg\n"
    "    // loaded a zero palette (SIGILL at the first tileloadd; ggml-org/llama.cpp#26954)\n"
    "    alignas(64) static const tile_config_t tc = [] {\n        tile_config_t c = {};\n"
    "        c.palette_id = 1;\n        c.start_row = 0;"
    + _TILE_ROWS.replace("    tc.", "        c.").replace(" tc.", " c.")
    + "        return c;\n    }();\n\n    _tile_loadconfig(&tc);")


def patch_tag() -> str:
    """A short name for the fix (a hash of its text): the AMX level's key in corral's wheel cache, so a changed fix
    is never served an older fixed build."""
    import hashlib

    return "tilecfg-" + hashlib.sha256(TILE_CONFIG_STATIC.encode()).hexdigest()[:8]


def amx_permitted() -> bool:
    """Whether Linux lets this process use AMX tile data (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``).

    ggml asks the same when it sets up its AMX buffers and, refused (Linux before 5.16, a hypervisor that does
    not enable the state), quietly multiplies on the plain AVX-512 kernels instead, where a Q8_0 copy is slower
    than F16: so a library's ``AMX_INT8`` is worth something only where this is true.
    """
    if not (sys.platform == "linux" and is_x86_64()):
        return False
    import ctypes

    arch_prctl, req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(arch_prctl, req_xcomp_perm, xfeature_xtiledata)) == 0
    except (OSError, AttributeError):
        return False


def patch_source(where: Path) -> Path:
    """Unpack the one llama-cpp-python sdist in ``where`` and fix ggml's AMX tile configuration in it; the source
    tree's path.  A source without that code (another llama.cpp) is an error, not a silent unpatched build."""
    (sdist,) = sorted(where.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on
            archive.extractall(where, filter="data")
        else:
            archive.extractall(where)  # the sdist pip has just fetched from the package index
    tree = where / sdist.name.removesuffix(".tar.gz")
    source = tree / AMX_SOURCE
    text = source.read_text(encoding="utf-8")
    if TILE_CONFIG_STATIC not in text:
        if TILE_CONFIG_ON_STACK not in text:
            raise ValueError(f"{source}: ggml's AMX tile configuration is not the code this fix knows")
        source.write_text(text.replace(TILE_CONFIG_ON_STACK, TILE_CONFIG_STATIC), encoding="utf-8")
    return tree


def compiled_features(system_info: str) -> set[str]:
    """The features llama_print_system_info() says are compiled into the CPU backend (``AVX2 = 1``)."""
    found: set[str] = set()
    for part in system_info.replace("\n", "|").split("|"):
        key, _, value = part.partition("=")
        name = key.split(":")[-1].strip()
        if value.strip() == "1" and name in FEATURE_FLAGS:
            found.add(name)
    return found


def describe(features: set[str]) -> str:
    """The variant name of a compiled feature set, as far as system_info can tell them apart."""
    reported = features & set(REPORTED)
    for variant in VARIANTS:
        if set(variant.features) & set(REPORTED) == reported:
            return variant.name
    return "custom"


def check_loaded(system_info: str, flags: set[str] | None = None) -> dict[str, Any]:
    """What the loaded library runs with, or :class:`KernelMismatch` where this CPU lacks some of it."""
    features = compiled_features(system_info)
    info: dict[str, Any] = {"variant": describe(features), "features": sorted(features)}
    if not is_x86_64():
        return info
    have = cpu_flags() if flags is None else flags
    if not have:
        return info  # no /proc/cpuinfo to compare against
    missing = sorted({flag for feature in features for flag in FEATURE_FLAGS[feature]} - have)
    if missing:
        best = choose(have, allow_amx=amx_allowed(dict(os.environ)))
        raise KernelMismatch(
            f"llama-cpp-python was built for the {info['variant']} kernels, which use {', '.join(missing)}; this CPU "
            f"lacks them and would stop on an illegal instruction. Rebuild on this machine (`make install` picks "
            f"{best.name}), or build with CORRAL_CPU_VARIANT=<a level every host has> for a shared image.")
    return info


def extract_libraries(wheel: Path, target: Path) -> None:
    """Unpack a llama-cpp-python wheel's shared libraries (``llama_cpp/lib/*``) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("llama_cpp/lib/") and not name.endswith("/"):
                (target / Path(name).name).write_bytes(archive.read(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp CPU kernel level for this machine")
    parser.add_argument("what", choices=["name", "cmake-args", "generation-name", "generation-cmake-args",
                                         "fallback-name", "fallback-cmake-args", "extract", "patch-source",
                                         "patch-tag"])
    parser.add_argument("paths", nargs="*", help="extract: WHEEL TARGET_DIR; patch-source: DIR holding the sdist")
    args = parser.parse_args(argv)
    if args.what == "extract":
        extract_libraries(Path(args.paths[0]), Path(args.paths[1]))
        return 0
    if args.what == "patch-tag":
        print(patch_tag())
        return 0
    if args.what == "patch-source":
        try:
            print(patch_source(Path(args.paths[0])))
        except (ValueError, OSError) as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    try:
        variant = choose_here()
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if variant is not None and args.what.startswith("generation-"):
        variant = generation_level(variant.flags(), variant)
    if variant is not None and args.what.startswith("fallback-"):
        variant = without_amx(variant)
    if args.what.endswith("name"):
        print(variant.name if variant else platform.machine().lower() or "unknown")
    else:
        print(" ".join(variant.cmake_args()) if variant else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
