"""How long a small job waits after a huge job was cancelled (or deleted) ahead of it.

A real stack (API + worker processes, SQLite, Redis) takes a generated JSONL job of ``--lines`` one-token
prompts (``--chunk-size`` 16: 62,500 chunks for a million lines), which is cancelled as soon as the submission
returns; then a 32-item job is submitted and timed to completion, against the same job on the idle stack.
Before stopped jobs' messages left the broker, the small job waited behind every dead chunk (about 9 hours for
62,500 of them).

    .venv/bin/python bench/cancel_backlog.py --lines 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, print_table, wait_for_job

MODEL = "smollm2"


def small_job(client: httpx.Client) -> tuple[float, int | None]:
    """(seconds until a 32-item job completed, its queue_position when submitted)."""
    started = time.monotonic()
    body = {"kind": "generate", "model": MODEL, "chunk_size": 4, "options": {"num_predict": 8, "temperature": 0},
            "items": [{"prompt": f"Say the number {i}."} for i in range(32)]}
    job = client.post("/api/jobs", json=body).json()
    done = wait_for_job(client, job["id"], poll=0.2)
    assert done["status"] == "completed", done
    return time.monotonic() - started, job["queue_position"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--stop", choices=("cancel", "delete"), default="cancel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        upload = home / "big.jsonl"
        upload.write_bytes(b'{"prompt": "x"}\n' * args.lines)
        with corral_stack(home) as stack, httpx.Client(base_url=stack.base_url, timeout=3600) as client:
            small_job(client)  # loads the model
            idle, _ = small_job(client)
            started = time.monotonic()
            with open(upload, "rb") as fh:
                params: dict[str, Any] = {"kind": "generate", "model": MODEL, "chunk_size": args.chunk_size,
                                          "options": json.dumps({"num_predict": 1})}
                big = client.post("/api/jobs", params=params, content=fh,
                                  headers={"Content-Type": "application/x-ndjson"}).json()
            submitted = time.monotonic() - started
            started = time.monotonic()
            if args.stop == "cancel":
                client.post(f"/api/jobs/{big['id']}/cancel")
            else:
                client.delete(f"/api/jobs/{big['id']}")
            stopped = time.monotonic() - started
            after, position = small_job(client)
            chunks = -(-args.lines // args.chunk_size)
            done = {"cancel": "cancelled", "delete": "deleted"}[args.stop]
            print_table(
                f"A {args.lines:,}-line job ({chunks:,} chunks) {done}, then a 32-item job",
                ["step", "seconds"],
                [["submit the big job (JSONL upload, SQLite)", submitted],
                 [f"{args.stop} it (messages leave the queue)", stopped],
                 ["32-item job on the idle stack", idle],
                 [f"32-item job after the {args.stop} (queue_position {position})", after]],
            )


if __name__ == "__main__":
    main()
