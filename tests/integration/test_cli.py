"""The ``corral`` CLI against the real running server: in-process with Click's CliRunner, and as a real process
(stdin upload, no TTY, a pseudo-terminal for interactive ``run``)."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from cli.main import main
from harness.processes import free_port
from harness.stack import wait_for
from tests.helpers import MODEL, Registry, cli, no_traceback, write_jsonl

FAST = ["-o", "num_predict=4", "-o", "temperature=0", "-o", "seed=1"]


def test_submit_wait_then_results_in_every_format(base_url: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"q{i}", "prompt": f"Count to {i}."} for i in range(5)])
    done = cli(base_url, "submit", str(source), "--model", MODEL, *FAST, "--chunk-size", "2", "--wait", "--interval", "0.2")
    assert done.exit_code == 0, done.output
    job_id = done.stdout.splitlines()[0]
    assert job_id.startswith("job_")
    assert "completed" in done.stdout and "5/5 done" in done.stdout  # no TTY here: plain progress lines

    jsonl = cli(base_url, "results", job_id)
    assert jsonl.exit_code == 0
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"q{i}" for i in range(5)]
    assert all(line["state"] == "succeeded" and line["response"]["eval_count"] == 4 for line in lines)

    out_csv = tmp_path / "out.csv"
    assert cli(base_url, "results", job_id, "--format", "csv", "-o", str(out_csv)).exit_code == 0
    with out_csv.open() as f:
        table = list(csv.DictReader(f))
    assert [r["custom_id"] for r in table] == [f"q{i}" for i in range(5)]
    assert [r["text"] for r in table] == [line["response"]["response"] for line in lines]

    import pyarrow.parquet as pq

    out_pq = tmp_path / "out.parquet"
    assert cli(base_url, "results", job_id, "--format", "parquet", "-o", str(out_pq)).exit_code == 0
    frame = pq.read_table(out_pq).to_pylist()
    assert [r["text"] for r in frame] == [r["text"] for r in table] and frame[0]["completion_tokens"] == 4

    status = cli(base_url, "status", job_id)
    assert status.exit_code == 0 and status.stdout.startswith(f"{job_id} completed, 5/5 done, 0 failed")
    listed = cli(base_url, "jobs", "--status", "completed", "--limit", "1000")
    assert job_id in listed.stdout

    assert cli(base_url, "rm", job_id).stdout.strip() == f"deleted '{job_id}'"
    gone = cli(base_url, "status", job_id)
    assert gone.exit_code == 1 and gone.stderr.strip() == f"Error: job '{job_id}' not found"
    no_traceback(gone)


def test_embed_results_are_float_lists_and_parquet_vector_columns(base_url: str, tmp_path: Path) -> None:
    rows = [{"custom_id": "a", "input": "alpha"}, {"custom_id": "b", "input": ["beta", "gamma"]}]
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    done = cli(base_url, "submit", str(source), "--model", MODEL, "--kind", "embed", "--wait", "--json")
    assert done.exit_code == 0, done.output
    job = json.loads(_first_json(done.stdout))
    lines = [json.loads(x) for x in cli(base_url, "results", job["id"]).stdout.splitlines()]
    assert all(isinstance(v, float) for v in lines[0]["response"]["embeddings"][0])

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "vectors.parquet"
    assert cli(base_url, "results", job["id"], "--format", "parquet", "-o", str(out)).exit_code == 0
    table = pq.read_table(out)
    column = table.schema.field("embedding").type
    assert pa.types.is_list(column) and column.value_type == pa.float32()
    rows = table.to_pylist()
    assert [(r["custom_id"], r["vector_index"]) for r in rows] == [("a", 0), ("b", 0), ("b", 1)]
    assert rows[2]["embedding"] == pytest.approx(lines[1]["response"]["embeddings"][1], abs=1e-6)


def _first_json(text: str) -> str:
    """The pretty-printed job object ``--json`` prints before the progress lines."""
    depth = 0
    for pos, char in enumerate(text):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0 and char == "}":
            return text[: pos + 1]
    raise AssertionError(f"no JSON object in {text!r}")


def test_plain_text_lines_are_prompts(base_url: str, tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("Name a colour.\n\nName a fruit.\n")
    done = cli(base_url, "submit", str(source), "--lines", "--model", MODEL, *FAST, "--wait")
    assert done.exit_code == 0, done.output
    job_id = done.stdout.splitlines()[0]
    lines = [json.loads(x) for x in cli(base_url, "results", job_id).stdout.splitlines()]
    assert len(lines) == 2 and all(line["state"] == "succeeded" for line in lines)
    wrong = cli(base_url, "submit", str(source), "--lines", "--kind", "chat", "--model", MODEL)
    assert wrong.exit_code == 2 and "--lines" in wrong.stderr


def test_cancel_makes_status_exit_4_and_keeps_finished_results(base_url: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"Tell a story about {i}."} for i in range(40)])
    job_id = cli(base_url, "submit", str(source), "--model", MODEL, "-o", "num_predict=16").stdout.strip()
    cancelled = cli(base_url, "cancel", job_id)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    status = cli(base_url, "status", job_id, "--watch", "--interval", "0.2")
    assert status.exit_code == 4
    counts: dict = {}

    def settled() -> bool:  # the item in flight stops within a few tokens
        counts.update(httpx.get(f"{base_url}/api/jobs/{job_id}").json()["counts"])
        return counts["running"] == 0

    wait_for(settled, 30, "the running item to stop")
    assert counts["cancelled"] > 0 and counts["pending"] == 0
    retry = cli(base_url, "retry", job_id)
    assert retry.exit_code == 1 and "no failed items" in retry.stderr


def test_user_mistakes_give_one_line_and_non_zero_exit(base_url: str, tmp_path: Path, local_registry: Registry) -> None:
    source = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hi"}])
    cases = [
        (["submit", str(source), "--model", MODEL, "-o", "temperature"], 1, "bad option 'temperature': expected KEY=VALUE"),
        (["submit", str(source), "--model", MODEL, "-o", "temperature=hot"], 1, "Error: option \"temperature\" must be of type"),
        (["submit", str(source), "--model", "no-such-model"], 1, "Error: model 'no-such-model' not found"),
        (["status", "job_000000000000000000000000"], 1, "Error: job 'job_000000000000000000000000' not found"),
        (["show", "no-such-model"], 1, "Error: model 'no-such-model:latest' not found"),
        (["rm", "no-such-model"], 1, "Error: model 'no-such-model' not found"),
        (["pull", f"{local_registry.host}/library/no-such-model", "--insecure"], 1,
         "Error: pull model manifest: file does not exist"),
    ]
    for args, code, message in cases:
        result = cli(base_url, *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.strip() == message or result.stderr.count("\n") == 1, result.stderr
        no_traceback(result)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"prompt": "ok"}\n{"prompt": \n')
    result = cli(base_url, "submit", str(bad_line), "--model", MODEL)
    assert result.exit_code == 1 and "line 2: not valid JSON" in result.stderr


def test_unreachable_server_is_one_clear_line(tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    for args in (["list"], ["jobs"], ["status", "job_000000000000000000000000"], ["run", MODEL, "hi"]):
        result = CliRunner().invoke(main, [*args, "--host", url])
        assert result.exit_code == 1
        assert result.stderr.strip().startswith(f"Error: could not connect to a corral server at http://{url}")
        no_traceback(result)


def test_model_commands(base_url: str) -> None:
    listed = cli(base_url, "list")
    assert listed.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert any(line.startswith("smollm2:135m ") and " MB " in line for line in listed.stdout.splitlines())

    shown = cli(base_url, "show", MODEL)
    assert re.search(r"^ +architecture +llama$", shown.stdout, re.M) and re.search(r"^ +completion$", shown.stdout, re.M)
    assert re.search(r"^ +context length +8192$", shown.stdout, re.M)

    assert cli(base_url, "cp", MODEL, "cli-copy").stdout.strip() == f"copied '{MODEL}' to 'cli-copy'"
    assert "cli-copy:latest" in cli(base_url, "list").stdout
    assert cli(base_url, "rm", "cli-copy").stdout.strip() == "deleted 'cli-copy'"
    assert "cli-copy" not in cli(base_url, "list").stdout

    pulled = cli(base_url, "pull", "smollm2:135m")
    assert pulled.exit_code == 0 and pulled.stdout.splitlines()[0] == "pulling manifest"
    assert pulled.stdout.splitlines()[-1] == "success"

    answer = cli(base_url, "run", MODEL, "What", "is", "2+2?", *FAST, "--keepalive", "5m")
    assert answer.exit_code == 0 and answer.stdout.strip()
    same = httpx.post(f"{base_url}/api/chat", json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "What is 2+2?"}],
        "options": {"num_predict": 4, "temperature": 0, "seed": 1},
    }, timeout=60).json()
    assert answer.stdout.strip() == same["message"]["content"].strip()
    ps = cli(base_url, "ps")
    assert ps.stdout.splitlines()[0].split()[:3] == ["NAME", "ID", "SIZE"]
    assert any(line.startswith("smollm2:latest ") and "100% CPU" in line for line in ps.stdout.splitlines())


def _env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_HOST", "OLLAMA_HOST")}
    env["CORRAL_HOST"] = base_url
    return env


def test_real_process_submits_from_stdin_and_waits(base_url: str) -> None:
    chats = [{"custom_id": f"s{i}", "messages": [{"role": "user", "content": f"Hi {i}"}]} for i in range(3)]
    body = "".join(json.dumps(chat) + "\n" for chat in chats)
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "-", "--model", MODEL, "--kind", "chat", *FAST, "--wait",
         "--interval", "0.2"],
        input=body, capture_output=True, text=True, env=_env(base_url), timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.splitlines()[0]
    assert proc.stdout.splitlines()[-1].startswith(f"{job_id} completed, 3/3 done, 0 failed")
    out = subprocess.run([sys.executable, "-m", "cli", "results", job_id], capture_output=True, text=True,
                         env=_env(base_url), timeout=60)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["custom_id"] for x in lines] == ["s0", "s1", "s2"]
    assert all(x["response"]["message"]["role"] == "assistant" for x in lines)


def test_run_without_prompt_is_an_interactive_chat_on_a_terminal(base_url: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a pseudo-terminal
        os.execve(sys.executable, [sys.executable, "-m", "cli", "run", MODEL, *FAST], _env(base_url))
    transcript = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal transcript
        deadline = time.monotonic() + timeout
        while marker not in transcript:
            assert time.monotonic() < deadline, transcript
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    transcript += os.read(fd, 4096)
                except OSError:
                    break

    try:
        read_until(b">>> ")
        os.write(fd, b"What is 2+2?\n")
        transcript = transcript.replace(b">>> ", b"", 1)
        read_until(b">>> ")
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    reply = transcript.split(b"What is 2+2?", 1)[1].split(b">>> ")[0].strip()
    assert reply, transcript


def test_status_watch_on_a_terminal_draws_a_progress_bar(base_url: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}])
    job_id = cli(base_url, "submit", str(source), "--model", MODEL, *FAST).stdout.strip()
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "cli", "status", job_id, "--watch", "--interval", "0.2"],
                  _env(base_url))
    screen = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, screen
            try:
                piece = os.read(fd, 4096)
            except OSError:
                break
            if not piece:
                break
            screen += piece
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, screen
    assert b"completed" in screen and b"2/2 done" in screen and b"\xe2\x94\x81" in screen  # rich's bar glyph
