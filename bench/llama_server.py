"""llama.cpp's own server against corral on the same concurrent chats (issue #39 item 5).

    env -u REDIS_URL -u TEST_DATABASE_URL .venv/bin/python bench/llama_server.py [--clients 8] [--tokens 64]
        [--slots 8] [--rounds 3] [--weights q8_0|native]

Why: with 8 chats arriving at once, corral's time to first token p50 was 407 ms against 57 ms for one alone.
Part of that is the arithmetic (8 prompts prefilled before the first of them decodes), part is corral's.  What
llama.cpp's own server gives on the same 8 requests, same weights, same threads and slots, separates the two:
the issue's goal is corral's p50 within 1.2x of it, with no less aggregate throughput.

How:
1. ``llama-server`` is built once from the llama.cpp that llama-cpp-python's sdist vendors (the version corral
   installs), with the CPU flags of the level corral generates on (corral/cpu_kernels.py), and kept in
   ``~/.cache/corral/llama-server-<version>-<level>/``.  The first run downloads the sdist from the package
   index and compiles (minutes); later runs start at once.
2. The same GGUF for both: SmolLM2-135M as corral's CPU workers load it (``--weights q8_0``: the Q8_0 copy
   workers/weights.py makes of the Q4_1 blob; ``native``: the blob itself).
3. ``llama-server -np <slots> -c <slots * 2048> -t <threads> --jinja`` (the GGUF's own chat template, as corral
   renders it) and ``corral serve`` + ``corral worker`` with ``OLLAMA_NUM_PARALLEL=<slots>``.
4. The same client on both: ``--clients`` streaming ``/v1/chat/completions`` requests at once (greedy,
   ``max_tokens=--tokens``, a story each), timed to each stream's first content and to its end; tokens are the
   reply's ``usage.completion_tokens`` (``stream_options.include_usage``).  One server runs at a time, the
   other stopped; ``--rounds`` alternating rounds (A B, B A, ...), and the medians of the rounds are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import corral_stack, model_path, print_table
from bench.concurrent_chat import TOPICS, percentile
from corral import cpu_kernels
from harness.processes import free_port
from workers.weights import prepare

LLAMA_VERSION = "0.3.36"  # the Makefile's LLAMA_VERSION: the llama.cpp corral runs
CACHE = Path.home() / ".cache" / "corral"
SLOT_CONTEXT = 2048


def generation_variant() -> cpu_kernels.Variant | None:
    best = cpu_kernels.choose_here()
    return cpu_kernels.generation_level(best.flags(), best) if best is not None else None


def build_server(variant: cpu_kernels.Variant | None) -> Path:
    """``llama-server`` of the vendored llama.cpp at the generation level's flags, built once and cached."""
    level = variant.name if variant else "native"
    binary = CACHE / f"llama-server-{LLAMA_VERSION}-{level}" / "llama-server"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(prefix="corral-llama-server-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--dest", str(work), f"llama-cpp-python=={LLAMA_VERSION}"], check=True)
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as sdist:
            sdist.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        flags = variant.cmake_args() if variant else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", *flags], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j",
                        str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "build" / "bin" / "llama-server", binary.with_suffix(".part"))
        binary.with_suffix(".part").rename(binary)
    return binary


@contextmanager
def llama_server(binary: Path, gguf: Path, slots: int, threads: int, log: Path) -> Iterator[str]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                 "-np", str(slots), "-c", str(slots * SLOT_CONTEXT), "-t", str(threads),
                                 "-tb", str(threads), "--jinja", "--no-webui"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy in 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat(url: str, model: str, topic: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first content, completion tokens) of one streaming OpenAI chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "temperature": 0, "max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, used = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                used = int(chunk["usage"]["completion_tokens"])
    return first or 0.0, used


def burst(url: str, model: str, clients: int, tokens: int) -> tuple[float, float, float]:
    """(aggregate tok/s, TTFT p50 ms, TTFT p95 ms) of ``clients`` chats sent at once."""
    topics = [TOPICS[i % len(TOPICS)] for i in range(clients)]
    chat(url, model, "warming up", 4)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda t: chat(url, model, t, tokens), topics))
    wall = time.perf_counter() - started
    ttft = [t * 1000 for t, _ in results]
    return sum(n for _, n in results) / wall, percentile(ttft, 50), percentile(ttft, 95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", choices=["q8_0", "native"], default="q8_0")
    args = parser.parse_args()
    variant = generation_variant()
    binary = build_server(variant)
    results: dict[str, list[tuple[float, float, float]]] = {"llama-server": [], "corral": []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        home = Path(tmp)
        blob = model_path(home, "smollm2")
        gguf = prepare(blob, args.weights, threads=args.threads) if args.weights != "native" else blob
        cpu_weights = "q8_0" if args.weights == "q8_0" else "native"
        for r in range(args.rounds):
            for name in ("llama-server", "corral") if r % 2 == 0 else ("corral", "llama-server"):
                if name == "llama-server":
                    with llama_server(binary, gguf, args.slots, args.threads, home / "llama-server.log") as url:
                        results[name].append(burst(url, "smollm2", args.clients, args.tokens))
                else:
                    with corral_stack(home, num_parallel=args.slots, cpu_weights=cpu_weights,
                                      worker_threads=args.threads, keep_alive=-1) as stack:
                        results[name].append(burst(stack.base_url, "smollm2", args.clients, args.tokens))
                rate, p50, p95 = results[name][-1]
                print(f"round {r + 1}: {name}: {rate:.1f} tok/s, TTFT p50 {p50:.0f} ms, p95 {p95:.0f} ms "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    base = {k: statistics.median(x[k] for x in results["llama-server"]) for k in range(3)}
    rows = []
    for name, runs in results.items():
        med = [statistics.median(x[k] for x in runs) for k in range(3)]
        rows.append([name, med[0], med[1], med[2], f"{med[0] / base[0]:.2f}x", f"{med[1] / base[1]:.2f}x",
                     " / ".join(f"{x[1]:.0f}" for x in runs)])
    print_table(f"{args.clients} streaming chats at once x {args.tokens} tokens, {args.slots} slots, {args.threads} "
                f"threads, SmolLM2-135M ({args.weights}), kernels {variant.name if variant else 'native'}; medians "
                f"of {args.rounds} rounds",
                ["server", "aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "tok/s vs llama-server",
                 "p50 vs llama-server", "p50 per round"], rows)


if __name__ == "__main__":
    main()
