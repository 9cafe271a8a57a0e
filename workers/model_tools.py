"""The llama.cpp side of ``/api/create``, run as a child process of a worker: ``python -m workers.model_tools JOB``.

Two jobs (``JOB`` is JSON):

- ``{"op": "check", "model": PATH, "adapters": [PATH, ...], "projectors": [PATH, ...]}``: load the GGUF as a
  worker would (weights mapped, not copied, on the CPU), each LoRA adapter onto it and each vision projector
  with it (libmtmd), so that a file llama.cpp cannot serve (an unknown architecture, missing tensors, an adapter
  or projector made for another model) fails the create, not the first chat.
- ``{"op": "quantize", "model": PATH, "output": PATH, "type": "Q4_K_M", "threads": N}``: llama.cpp's
  ``llama_model_quantize``, requantizing a Q8_0 source when asked.

A child process because a malformed file can crash llama.cpp natively, and then only this create fails, not the
worker and the requests it serves; and because llama.cpp's log callback, where its load errors and quantize
progress are said, is process-wide.  stdout carries JSON lines: ``{"progress": [done, total]}`` while quantizing,
then ``{"ok": true}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
from typing import Any

# llama-quant.cpp logs each tensor as it goes: "[  12/ 272]  blk.0.attn_q.weight - [576, 576], type = f16, ..."
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_GGML_LOG_LEVEL_ERROR = 4


def say(**line: Any) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    job = json.loads(argv[1])
    import llama_cpp

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _: Any) -> None:
        line = text.decode(errors="replace")
        match = _TENSOR_LINE.match(line)
        if match:
            say(progress=[int(match.group(1)), int(match.group(2))])
        elif level == _GGML_LOG_LEVEL_ERROR or "error loading model" in line:
            errors.append(line.strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    def reason(default: str) -> str:
        """llama.cpp's own words for a failure: its first error line, without the function-name prefix."""
        for line in errors:
            if "error loading model:" in line:
                return line.split("error loading model:", 1)[1].strip()
        return errors[0].split(": ", 1)[-1] if errors else default

    if job["op"] == "check":
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        model = llama_cpp.llama_model_load_from_file(job["model"].encode(), params)
        if not model:
            say(error=f"llama.cpp cannot load this model: {reason('unknown error')}")
            return 0
        for path in job.get("adapters") or []:
            errors.clear()
            adapter = llama_cpp.llama_adapter_lora_init(model, path.encode())
            if not adapter:
                say(error=f"llama.cpp cannot apply the adapter to this model: {reason('unknown error')}")
                return 0
        for path in job.get("projectors") or []:
            errors.clear()
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_log_set(on_log, ctypes.c_void_p(0))
            mparams = mtmd.mtmd_context_params_default()
            mparams.use_gpu, mparams.print_timings = False, False
            projector = mtmd.mtmd_init_from_file(path.encode(), model, mparams)
            if not projector:
                say(error=f"llama.cpp cannot use the vision projector with this model: {reason('unknown error')}")
                return 0
            mtmd.mtmd_free(projector)
        llama_cpp.llama_model_free(model)
        say(ok=True)
        return 0
    if job["op"] == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['type']}")
        params.allow_requantize = True
        params.nthread = max(1, int(job.get("threads") or 1))
        rc = llama_cpp.llama_model_quantize(job["model"].encode(), job["output"].encode(), ctypes.byref(params))
        if rc != 0:
            say(error=f"quantizing failed: {reason(f'llama_model_quantize returned {rc}')}")
            return 0
        say(ok=True)
        return 0
    say(error=f"unknown op {job['op']!r}")
    return 2


if __name__ == "__main__":
    os.environ.setdefault("GGML_LOG_COLORS", "0")
    raise SystemExit(main(sys.argv))
