"""Job commands: ``submit``, ``status``, ``results``, ``jobs``, ``cancel``, ``retry`` (``rm`` lives in cli.py).

Uploads stream from the file (or stdin) in 1 MiB pieces with chunked transfer encoding, so a multi-GB JSONL
never sits in memory on either side.  ``status --watch`` polls ``GET /api/jobs/{id}``: a ``rich`` progress bar
on a terminal, one plain line per change otherwise.  Exit codes of ``status``/``submit --wait``: 0 completed,
3 failed, 4 cancelled, 5 expired (1 is an error, 2 a usage mistake, as everywhere in Click).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from cli.client import CorralClient, file_chunks
from cli.common import columns, parse_pairs, stdout_is_tty, with_client
from jobs.export import FORMATS, ExportError, write_csv, write_jsonl, write_npy, write_parquet
from jobs.states import JobStatus

EXIT_CODES = {"completed": 0, "failed": 3, "cancelled": 4, "expired": 5}
# Cancelling a job writes each of its pending items: a million took 28-32 s on the project's 2-core VM with
# PostgreSQL (bench/README.md), past the client's usual 30 s.  Retrying and deleting a job write many rows too.
STOP_TIMEOUT = 600.0
TERMINAL = tuple(EXIT_CODES)


def _done(counts: dict[str, int]) -> int:
    return counts["succeeded"] + counts["failed"] + counts["cancelled"]


def _summary(job: dict[str, Any]) -> str:
    counts = job["counts"]
    parts = [f"{job['id']} {job['status']}", f"{_done(counts)}/{counts['total']} done", f"{counts['failed']} failed"]
    if counts["cancelled"]:
        parts.append(f"{counts['cancelled']} cancelled")
    if job.get("tokens_per_second"):
        parts.append(f"{job['tokens_per_second']:.1f} tok/s")
    if job.get("eta_seconds") is not None:
        parts.append(f"eta {_duration(job['eta_seconds'])}")
    if job.get("queue_position"):
        parts.append(f"{job['queue_position']} chunks ahead")
    if job.get("error"):
        parts.append(f"error: {job['error']}")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def watch(client: CorralClient, job_id: str, interval: float) -> dict[str, Any]:
    """Poll a job until it ends; show progress; return the final job object."""
    job = client.job(job_id)
    if not stdout_is_tty():
        last = ""
        while True:
            line = _summary(job)
            if line != last:
                click.echo(line)
                last = line
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)
            job = client.job(job_id)
    console = Console()
    columns = (
        TextColumn("[bold]{task.fields[status]:>9}"), BarColumn(), TaskProgressColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} done, [red]{task.fields[failed]} failed[/]"),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(job_id, total=max(job["counts"]["total"], 1), status="", failed=0, rate="", eta="")
        while True:
            counts = job["counts"]
            rate = f"{job['tokens_per_second']:.1f} tok/s" if job.get("tokens_per_second") else ""
            eta = f"eta {_duration(job['eta_seconds'])}" if job.get("eta_seconds") is not None else ""
            if job.get("queue_position"):
                eta = f"{job['queue_position']} chunks ahead"
            progress.update(
                task, completed=_done(counts), status=job["status"],
                failed=counts["failed"], rate=rate, eta=eta,
            )
            if job["status"] in TERMINAL:
                break
            time.sleep(interval)
            job = client.job(job_id)
    if job.get("error"):
        console.print(f"[red]error:[/] {job['error']}")
    return job


def show_dry_run(answer: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    eta = answer["eta"] or {}
    rows = [
        ("items", f"{answer['items']:,}"),
        ("duplicates (run once)", f"{answer['duplicates']:,}"),
        ("prompt tokens", f"{answer['prompt_tokens']:,}"),
        ("output tokens, at most", f"{answer['output_token_bound']:,}"),
        ("ETA", f"{answer['eta_seconds']:,.0f} s at most ({eta.get('tokens_per_second')} tok/s on "
                f"{eta.get('workers')} worker(s))" if answer["eta_seconds"] is not None else f"unknown: {eta.get('reason')}"),
    ]
    if answer.get("items_failing"):
        rows.append(("items that would fail", f"{answer['items_failing']:,}"))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


@click.command()
@click.argument("source", type=click.File("rb", lazy=True), metavar="FILE|-")
@click.option("--model", "-m", required=True, help="Model every item runs on.")
@click.option("--kind", type=click.Choice(["generate", "chat", "embed", "rerank"]), default="generate", show_default=True)
@click.option("--lines", is_flag=True, help="FILE is plain text: each non-blank line is a prompt (kind generate).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help="Model option for every item (repeatable).")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), help="Items per worker task (default: the server's).")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Free-form job metadata (repeatable).")
@click.option("--cache", is_flag=True, help="Reuse cached results of deterministic requests (temperature 0 or a seed).")
@click.option("--completion-window", metavar="DURATION", help="Finish within this long (90m, 1h, 24h): scheduled "
              "earliest deadline first; unfinished work expires then.")
@click.option("--priority", type=click.IntRange(-10, 10), default=0, help="Each point: an hour earlier in the schedule.")
@click.option("--dry-run", is_flag=True, help="Validate and count (items, prompt tokens, duplicates, output bound, ETA); "
              "store and run nothing.")
@click.option("--wait", is_flag=True, help="Watch the job until it ends; exit 0 completed, 3 failed, 4 cancelled, 5 expired.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between polls with --wait.")
@click.option("--json", "as_json", is_flag=True, help="Print the job object as JSON instead of its id.")
@with_client
def submit(
    client: CorralClient, source: IO[bytes], model: str, kind: str, lines: bool, options: tuple[str, ...],
    chunk_size: int | None, metadata: tuple[str, ...], cache: bool, completion_window: str | None, priority: int,
    dry_run: bool, wait: bool, interval: float, as_json: bool,
) -> None:
    """Submit FILE (JSONL, one request body per line; `-` reads stdin) as a batch job."""
    if lines and kind != "generate":
        raise click.UsageError("--lines makes each line a prompt: use it with --kind generate")
    params = {
        "kind": kind, "model": model, "options": parse_pairs(options) or None, "chunk_size": chunk_size,
        "metadata": parse_pairs(metadata, "metadata") or None, "cache": "true" if cache else None,
        "completion_window": completion_window, "priority": priority or None,
    }
    content_type = "text/plain" if lines else "application/x-ndjson"
    if dry_run:
        with source as handle:
            answer = client.submit_stream(file_chunks(handle), content_type=content_type, params={**params, "dry_run": "true"})
        if as_json:
            click.echo(json.dumps(answer, indent=2))
        else:
            show_dry_run(answer)
        return
    with source as handle:
        job = client.submit_stream(file_chunks(handle), content_type=content_type, params=params)
    click.echo(json.dumps(job, indent=2) if as_json else job["id"])
    if wait:
        final = watch(client, job["id"], interval)
        sys.exit(EXIT_CODES.get(final["status"], 1))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("--watch", "-w", "follow", is_flag=True, help="Refresh until the job ends.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between polls.")
@click.option("--json", "as_json", is_flag=True, help="Print the job object as JSON.")
@with_client
def status(client: CorralClient, job_id: str, follow: bool, interval: float, as_json: bool) -> None:
    """Show a job's progress; exit 0 completed, 3 failed, 4 cancelled, 5 expired (0 while it is still going)."""
    job = watch(client, job_id, interval) if follow else client.job(job_id)
    if as_json:
        click.echo(json.dumps(job, indent=2))
    elif not follow:
        click.echo(_summary(job))
    sys.exit(EXIT_CODES.get(job["status"], 0))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to FILE instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option("--failed", is_flag=True, help="Only the failed items (e.g. to fix and resubmit them).")
@with_client
def results(client: CorralClient, job_id: str, output: str | None, fmt: str, failed: bool) -> None:
    """Stream a job's results in input order (JSONL lines as GET /api/jobs/{id}/results sends them)."""
    kind = client.job(job_id)["kind"]
    # Embedding exports carry each vector's text; the JSONL stays exactly what the API sends.
    lines = client.results(job_id, state="failed" if failed else None, include_input=kind == "embed" and fmt != "jsonl")
    try:
        if fmt in ("parquet", "npy"):
            if not output:
                raise click.UsageError(f"--format {fmt} needs --output FILE")
            count = (write_parquet if fmt == "parquet" else write_npy)(lines, kind, output)
        elif fmt == "csv":
            with (open(output, "w", newline="", encoding="utf-8") if output else _stdout_text()) as out:
                count = write_csv(lines, kind, out)
        else:
            with (open(output, "wb") if output else _stdout_bytes()) as out:
                count = write_jsonl(lines, out)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    if output:
        click.echo(f"wrote {count} rows to {output}", err=True)


class _Unclosed:
    """A context manager around a standard stream that flushes instead of closing it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __enter__(self) -> Any:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()


def _stdout_bytes() -> _Unclosed:
    return _Unclosed(sys.stdout.buffer)


def _stdout_text() -> _Unclosed:
    return _Unclosed(sys.stdout)


@click.command("jobs")
@click.option("--status", "state", type=click.Choice(list(JobStatus.ALL)))
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@with_client
def list_jobs(client: CorralClient, state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    reply = client.jobs(state, limit)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    table = [["ID", "STATUS", "KIND", "MODEL", "DONE", "FAILED", "CREATED"]]
    for job in reply["jobs"]:
        c = job["counts"]
        table.append([job["id"], job["status"], job["kind"], job["model"], f"{_done(c)}/{c['total']}", str(c["failed"]),
                      job["created_at"][:19].replace("T", " ")])
    click.echo(columns(table))


def _control(action: str, doc: str) -> click.Command:
    """``corral cancel`` / ``corral retry``: POST /api/jobs/{id}/<action>, print the job's summary."""

    @with_client
    def command(client: CorralClient, job_id: str) -> None:
        click.echo(_summary(client.request("POST", f"/api/jobs/{job_id}/{action}", timeout=STOP_TIMEOUT)))

    command.__doc__ = doc
    return click.command(action)(click.argument("job_id", metavar="JOB")(command))


cancel = _control("cancel", "Cancel a job: pending items stop; finished results stay.")
retry = _control("retry", "Run a finished job's failed items again.")


COMMANDS = [submit, status, results, list_jobs, cancel, retry]
