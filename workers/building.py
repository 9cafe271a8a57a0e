"""Build tasks for ``/api/create``: check that llama.cpp loads a new GGUF and its adapters, and quantize.

The API never loads llama.cpp, so it sends these to the ``corral.build`` queue, which every worker sharing its
model store consumes, and follows the reply stream as it follows a chat.  The llama.cpp work itself runs in a
child process (workers/model_tools.py): a file that crashes llama.cpp fails its create and nothing else.  A
quantized file is written beside the blobs, hashed, and moved into the store under its digest; the API writes
the manifest that refers to it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.errors import BadRequest, GenerationFailed
from corral.modelstore.store import ModelStore, sha256_file
from corral.protocol import QUANT_TYPES, BuildRequest, StreamWriter

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.5  # seconds between progress events (a model has hundreds of tensors)


def run_build(store: ModelStore, req: BuildRequest, writer: StreamWriter, *, threads: int) -> None:
    """Run one build request, writing ``progress`` events and a final ``result`` (or ``error``) to ``writer``."""
    model = store.blob_path(req.model_digest)
    if not model.is_file():
        raise BadRequest(f"this worker's store has no blob sha256:{req.model_digest}; build workers must share the "
                         "API's model store")
    if req.op == "check":
        adapters = [str(store.blob_path(d)) for d in req.adapters]
        projectors = [str(store.blob_path(d)) for d in req.projectors]
        _child({"op": "check", "model": str(model), "adapters": adapters, "projectors": projectors}, writer)
        writer.emit("result", {})
        return
    if req.quantize not in QUANT_TYPES:
        raise BadRequest(f"unsupported quantization type {req.quantize}")
    fd, tmp_name = tempfile.mkstemp(dir=model.parent, prefix=".partial-quantize-")
    os.close(fd)
    try:
        _child({"op": "quantize", "model": str(model), "output": tmp_name, "type": req.quantize,
                "threads": threads}, writer)
        digest = sha256_file(Path(tmp_name))
        size = Path(tmp_name).stat().st_size
        os.replace(tmp_name, store.blob_path(digest))
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    log.info("quantized sha256:%s to %s: sha256:%s (%d bytes)", req.model_digest[:12], req.quantize, digest[:12], size)
    writer.emit("result", {"digest": f"sha256:{digest}", "size": size})


def _child(job: dict[str, object], writer: StreamWriter) -> None:
    """Run workers/model_tools.py on ``job``, passing its progress on; raise its error.  A client that goes away
    stops it."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # checking and quantizing need no GPU memory
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.model_tools", json.dumps(job)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    assert proc.stdout is not None
    outcome: dict[str, object] = {}
    last = 0.0
    try:
        for line in proc.stdout:
            try:
                said = json.loads(line)
            except ValueError:
                continue  # something else wrote to stdout
            if "progress" in said:
                done, total = said["progress"]
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY or done == total:
                    last = now
                    if writer.emit("progress", {"completed": done, "total": total}):
                        raise GenerationFailed("cancelled: the client went away")
            else:
                outcome = said
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if "error" in outcome:
        raise BadRequest(str(outcome["error"]))
    if not outcome.get("ok"):
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise BadRequest(f"llama.cpp crashed ({how}) on this model file")
