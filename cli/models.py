"""Ollama-style model commands: ``list``, ``ps``, ``show``, ``create``, ``cp``, ``pull``, ``run`` (``rm`` lives in
cli/main.py).

Output follows the ``ollama`` CLI closely (same columns, same confirmations), so muscle memory carries over.
``run`` streams tokens from ``/api/chat``; with no prompt on a terminal it is an interactive chat that keeps
the conversation (``/bye`` ends it, ``/clear`` forgets it); with no prompt and piped stdin, stdin is the prompt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import httpx
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn

from cli.client import ClientError, CorralClient
from cli.common import columns, human_size, parse_pairs, stdout_is_tty, with_client
from corral.errors import BadRequest
from corral.modelstore.modelfile import create_body, parse_modelfile


def _ago(stamp: str) -> str:
    """``2024-05-01T10:00:00+02:00`` -> ``3 days ago`` (Ollama's MODIFIED column)."""
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = (datetime.now(timezone.utc) - moment).total_seconds()
    for unit, size in (("year", 31_536_000), ("month", 2_592_000), ("week", 604_800), ("day", 86_400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "Less than a minute ago" if seconds >= 1 else "Less than a second ago"


def _until(stamp: str) -> str:
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = (moment - datetime.now(timezone.utc)).total_seconds()
    if seconds > 10 * 365 * 86_400:
        return "Forever"
    if seconds <= 0:
        return "Stopping..."
    minutes = int(seconds // 60)
    if minutes >= 2:
        return f"{minutes} minutes from now"
    return "About a minute from now" if minutes else "Less than a minute from now"


@click.command("list")
@with_client
def list_models(client: CorralClient) -> None:
    """List models in the server's store."""
    table = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for model in client.request("GET", "/api/tags")["models"]:
        table.append([model["name"], model["digest"][:12], human_size(model["size"]), _ago(model["modified_at"])])
    click.echo(columns(table))


@click.command()
@with_client
def ps(client: CorralClient) -> None:
    """List loaded models, with the worker memory they use and when they unload."""
    table = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for model in client.request("GET", "/api/ps")["models"]:
        size, vram = model.get("size", 0), model.get("size_vram", 0)
        if not vram:
            processor = "100% CPU"
        elif vram >= size:
            processor = "100% GPU"
        else:
            gpu = round(100 * vram / size)
            processor = f"{100 - gpu}%/{gpu}% CPU/GPU"
        table.append([model["name"], model["digest"][:12], human_size(size), processor,
                      str(model.get("context_length", "")), _until(model["expires_at"])])
    click.echo(columns(table))


@click.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the /api/show reply as JSON.")
@click.option("--modelfile", "part", flag_value="modelfile", help="Print the Modelfile that recreates it.")
@click.option("--parameters", "part", flag_value="parameters", help="Print its default parameters.")
@click.option("--system", "part", flag_value="system", help="Print its system prompt.")
@click.option("--template", "part", flag_value="template", help="Print its chat template.")
@click.option("--license", "part", flag_value="license", help="Print its license.")
@with_client
def show(client: CorralClient, model: str, as_json: bool, part: str | None) -> None:
    """Show a model's architecture, size, context length and capabilities (or one part of it)."""
    info = client.request("POST", "/api/show", json={"model": model})
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    if part:
        click.echo(info.get(part) or "")
        return
    details, model_info = info.get("details") or {}, info.get("model_info") or {}
    arch = model_info.get("general.architecture", details.get("family", ""))
    rows = [
        ["architecture", str(arch)],
        ["parameters", str(details.get("parameter_size", ""))],
        ["context length", str(model_info.get(f"{arch}.context_length", ""))],
        ["embedding length", str(model_info.get(f"{arch}.embedding_length", ""))],
        ["quantization", str(details.get("quantization_level", ""))],
    ]
    click.echo("  Model")
    click.echo("\n".join("    " + line for line in columns([r for r in rows if r[1]]).splitlines()))
    click.echo("\n  Capabilities")
    for capability in info.get("capabilities") or []:
        click.echo(f"    {capability}")


@click.command()
@click.argument("name")
@click.option("-f", "--file", "modelfile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default="Modelfile", show_default=True, help="The Modelfile to read.")
@click.option("-q", "--quantize", help="Quantize the weights to this type (q8_0, q4_K_M, ...) from F16, F32 or Q8_0.")
@with_client
def create(client: CorralClient, name: str, modelfile: Path, quantize: str | None) -> None:
    """Create a model from a Modelfile (FROM a GGUF file or a model; ADAPTER, TEMPLATE, SYSTEM, PARAMETER,
    MESSAGE, LICENSE), uploading local files the server lacks."""
    try:
        body = create_body(parse_modelfile(modelfile.read_text()))
    except BadRequest as exc:
        raise click.ClickException(f"{modelfile}: {exc.message}") from exc
    source = (modelfile.parent / body["from"]).expanduser()
    if source.is_file():  # FROM a local GGUF: upload it unless the server has it already
        del body["from"]
        body["files"] = {source.name: upload_blob(client, source)}
    elif source.is_dir():  # FROM a Hugging Face model directory: its weights, config and tokenizer files
        del body["from"]
        body["files"] = {path.relative_to(source).as_posix(): upload_blob(client, path) for path in model_files(source)}
        if not body["files"]:
            raise click.ClickException(f"{source}: no .safetensors or .gguf files in this directory")
    for written in body.pop("projectors", []):  # a second FROM: a vision projector file, uploaded into files
        path = (modelfile.parent / written).expanduser()
        if not path.is_file():
            raise click.ClickException(f"{modelfile}: FROM {written}: a second FROM must be a projector file")
        body.setdefault("files", {})[path.name] = upload_blob(client, path)
    if body.get("adapters"):  # ADAPTER files: uploaded like FROM's
        adapters = {}
        for written in body["adapters"]:
            path = (modelfile.parent / written).expanduser()
            if not path.is_file():
                raise click.ClickException(f"{modelfile}: ADAPTER {written}: no such file")
            adapters[path.name] = upload_blob(client, path)
        body["adapters"] = adapters
    if quantize:
        body["quantize"] = quantize
    steps = client.stream_json("POST", "/api/create", json={"model": name, "stream": True, **body}, read_timeout=None)
    show_progress(steps, MofNCompleteColumn(), err=True)  # quantizing counts tensors
    click.echo(f"created '{name}'")


# The files of a Hugging Face model directory that a conversion reads (not README.md, ONNX exports, ...).
MODEL_FILE_PATTERNS = ("*.safetensors", "*.gguf", "*.json", "vocab.txt", "tokenizer.model", "*/config.json")


def model_files(directory: Path) -> list[Path]:
    return sorted({path for pattern in MODEL_FILE_PATTERNS for path in directory.glob(pattern) if path.is_file()})


def upload_blob(client: CorralClient, path: Path) -> str:
    """Upload ``path`` as a blob when the server lacks it (HEAD first); its digest either way."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = f"sha256:{h.hexdigest()}"
    if client.head(f"/api/blobs/{digest}") == 200:
        return digest
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh, Progress(TextColumn(f"uploading {path.name}"), BarColumn(), DownloadColumn(),
                                              disable=not stdout_is_tty()) as progress:
            task = progress.add_task("upload", total=size)
            for block in iter(lambda: fh.read(1 << 20), b""):
                progress.advance(task, len(block))
                yield block

    client.request("POST", f"/api/blobs/{digest}", content=chunks(), timeout=httpx.Timeout(None, connect=10.0))
    return digest


@click.command()
@click.argument("source")
@click.argument("destination")
@with_client
def cp(client: CorralClient, source: str, destination: str) -> None:
    """Copy a model under a new name (no data is copied)."""
    client.request("POST", "/api/copy", json={"source": source, "destination": destination})
    click.echo(f"copied '{source}' to '{destination}'")


@click.command()
@click.argument("model")
@click.option("--insecure", is_flag=True, help="Use plain http to the registry (a local or private one).")
@with_client
def pull(client: CorralClient, model: str, insecure: bool) -> None:
    """Pull a model from its registry (Ollama's, another host, hf.co/...), or build a default model from its
    installed package; a download that was interrupted resumes."""
    body = {"model": model, "stream": True, "insecure": insecure}
    show_progress(client.stream_json("POST", "/api/pull", json=body, read_timeout=None), DownloadColumn())


def show_progress(steps: Iterator[dict[str, Any]], counter: ProgressColumn, *, err: bool = False) -> None:
    """Ollama's progress lines (pull, create) on a terminal: a bar for each step that counts (with ``counter``:
    bytes or tensors), a line for each other step.  Without a terminal: one line per step, not per report, on
    stderr when ``err`` (all but the final ``success``)."""
    if not stdout_is_tty():
        shown: set[str] = set()
        for step in steps:
            if step["status"] not in shown:
                shown.add(step["status"])
                click.echo(step["status"], err=err and step["status"] != "success")
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), counter) as progress:
        bars: dict[str, Any] = {}
        for step in steps:
            if "total" in step:
                key = step.get("digest", step["status"]) + step["status"]
                if key not in bars:
                    bars[key] = progress.add_task(step["status"], total=step["total"])
                progress.update(bars[key], completed=step.get("completed", 0))
            else:
                progress.console.print(step["status"])


@click.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--format", "fmt", help='"json" or a JSON schema: constrain the output.')
@click.option("--system", help="System message.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE", help="Model option (repeatable).")
@click.option("--keepalive", help="How long the model stays loaded afterwards, e.g. 5m, 0.")
@click.option("--verbose", is_flag=True, help="Print timings after each reply.")
@click.option("--think", is_flag=False, flag_value="true", default=None, metavar="[true|false|low|medium|high|max]",
              help="Thinking on (or a level) or off, for a model that thinks; it thinks by default.")
@click.option("--hidethinking", is_flag=True, help="Do not print the model's thinking.")
@with_client
def run(
    client: CorralClient, model: str, prompt: tuple[str, ...], fmt: str | None, system: str | None,
    options: tuple[str, ...], keepalive: str | None, verbose: bool, think: str | None, hidethinking: bool,
) -> None:
    """Run a model: answer PROMPT, or chat interactively when no prompt is given."""
    body: dict[str, Any] = {"model": model, "options": parse_pairs(options)}
    if think is not None:
        body["think"] = {"true": True, "false": False}.get(think.lower(), think)
    body["hide_thinking"] = hidethinking  # not sent: read by _reply
    if fmt:
        try:
            body["format"] = json.loads(fmt) if fmt.strip().startswith("{") else fmt
        except json.JSONDecodeError as exc:
            raise click.UsageError(f"--format is neither 'json' nor a JSON schema: {exc}") from exc
    if keepalive is not None:
        body["keep_alive"] = keepalive
    info = client.request("POST", "/api/show", json={"model": model})
    text = " ".join(prompt)
    if not text and not sys.stdin.isatty():
        text = sys.stdin.read()
    if "embedding" in (info.get("capabilities") or []):
        if not text:
            raise click.UsageError("an embedding model needs input: corral run MODEL TEXT")
        embed = {k: v for k, v in body.items() if k in ("model", "options", "keep_alive")}
        reply = client.request("POST", "/api/embed", json={**embed, "input": text})
        click.echo(json.dumps(reply["embeddings"][0]))
        return
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if text:
        _reply(client, body, history + [{"role": "user", "content": text}], verbose)
        return
    _interactive(client, body, history, verbose)


def _reply(client: CorralClient, body: dict[str, Any], messages: list[dict[str, str]], verbose: bool) -> str:
    """Stream one assistant reply to stdout and return its text."""
    parts: list[str] = []
    final: dict[str, Any] = {}
    hide = body.get("hide_thinking", False)
    request = {k: v for k, v in body.items() if k != "hide_thinking"}
    thinking = False  # inside the "Thinking..." block, as Ollama's CLI shows it
    for chunk in client.stream_json("POST", "/api/chat", json={**request, "messages": messages, "stream": True}):
        thought = (chunk.get("message") or {}).get("thinking", "")
        if thought and not hide:
            if not thinking:
                click.secho("Thinking...", dim=True)
                thinking = True
            click.secho(thought, nl=False, dim=True)
        piece = (chunk.get("message") or {}).get("content", "")
        if piece:
            if thinking:
                click.secho("\n...done thinking.\n", dim=True)
                thinking = False
            parts.append(piece)
            click.echo(piece, nl=False)
        if chunk.get("done"):
            final = chunk
    if thinking:
        click.secho("\n...done thinking.", dim=True)
    click.echo("\n" if stdout_is_tty() else "")
    if verbose and final:
        seconds = final.get("eval_duration", 0) / 1e9
        rate = final.get("eval_count", 0) / seconds if seconds else 0.0
        click.echo(f"eval count: {final.get('eval_count', 0)} tokens, eval rate: {rate:.2f} tokens/s", err=True)
    return "".join(parts)


def _interactive(client: CorralClient, body: dict[str, Any], history: list[dict[str, str]], verbose: bool) -> None:
    base = list(history)
    click.echo("Type a message; /clear forgets the conversation, /bye (or Ctrl-D) ends it.", err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("")
            return
        command = line.strip()
        if not command:
            continue
        if command in ("/bye", "/exit"):
            return
        if command == "/clear":
            history = list(base)
            click.echo("Cleared session context")
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _reply(client, body, history, verbose)
        except KeyboardInterrupt:
            click.echo("")
            history.pop()
            continue
        except ClientError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})


COMMANDS = [list_models, ps, show, create, cp, pull, run]
