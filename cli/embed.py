"""``corral embed`` (a folder of documents -> one embedding job) and ``corral search`` (query a job's vectors).

``embed`` walks the paths, extracts text, splits it into token-aware chunks with overlap and streams the items
into ``POST /api/jobs`` as they are made: memory holds one document, whatever the corpus size.  With
``--manifest FILE`` it remembers each file's sha256 and the job that embedded it, and a re-run skips the files
that did not change (their vectors stay in the earlier job).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from cli.client import ClientError, CorralClient
from cli.common import parse_pairs, with_client
from cli.corpus import (
    EstimateCounter,
    WordPieceCounter,
    chunk_text,
    counter_for,
    documents,
    walk,
)
from cli.jobs import EXIT_CODES, watch
from corral.corpus import DEFAULT_GLOBS, TEXT_FIELDS, CorpusError


class _Stats:
    def __init__(self) -> None:
        self.files = self.skipped = self.chunks = 0
        self.hashes: dict[str, str] = {}


def _items(
    paths: list[Path], globs: tuple[str, ...], fields: tuple[str, ...], counter: EstimateCounter | WordPieceCounter,
    chunk_tokens: int,
    overlap: int, known: dict[str, dict[str, str]], stats: _Stats,
) -> Iterator[bytes]:
    for path, root in walk(paths, globs):
        key = str(path.resolve())
        for number, doc in enumerate(documents(path, root, fields)):
            if number == 0:
                stats.hashes[key] = doc.sha256
                if known.get(key, {}).get("sha256") == doc.sha256:
                    stats.skipped += 1
                    break
                stats.files += 1
            for n, chunk in enumerate(chunk_text(doc.text, counter, chunk_tokens, overlap)):
                stats.chunks += 1
                item = {
                    "custom_id": f"{doc.source}#{n}",
                    "input": chunk.text,
                    "metadata": {"source": doc.source, "chunk": n, "start": chunk.start, "end": chunk.end,
                                 "sha256": doc.sha256},
                }
                yield (json.dumps(item, ensure_ascii=False) + "\n").encode()


def _buffered(lines: Iterator[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    """Group small lines into ~1 MiB upload pieces."""
    buf: list[bytes] = []
    held = 0
    for line in lines:
        buf.append(line)
        held += len(line)
        if held >= size:
            yield b"".join(buf)
            buf, held = [], 0
    if buf:
        yield b"".join(buf)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "-m", default="all-minilm", show_default=True, help="Embedding model.")
@click.option("--chunk-tokens", type=click.IntRange(8, 8192), default=256, show_default=True, help="Tokens per chunk.")
@click.option("--overlap", type=click.IntRange(0, 4096), default=32, show_default=True, help="Tokens shared by neighbours.")
@click.option("--glob", "globs", multiple=True,
              help=f"File patterns in folders (repeatable) [default: {' '.join(DEFAULT_GLOBS)}].")
@click.option("--field", "fields", multiple=True, help=f"JSON/JSONL text fields (repeatable) [default: {' '.join(TEXT_FIELDS)}].")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Skip files unchanged since the run that wrote this file.")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), default=64, show_default=True, help="Items per worker task.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Job metadata (repeatable).")
@click.option("--wait", is_flag=True, help="Watch the job until it ends.")
@click.option("--interval", type=float, default=1.0, show_default=True)
@with_client
def embed(
    client: CorralClient, paths: tuple[Path, ...], model: str, chunk_tokens: int, overlap: int, globs: tuple[str, ...],
    fields: tuple[str, ...], manifest: Path | None, chunk_size: int, metadata: tuple[str, ...], wait: bool, interval: float,
) -> None:
    """Embed documents (txt, md, html, json/jsonl fields, pdf with pypdf) as one job of token-aware chunks."""
    if overlap >= chunk_tokens - 2:
        raise click.UsageError("--overlap must be smaller than --chunk-tokens minus 2")
    show = client.request("POST", "/api/show", json={"model": model, "verbose": True})
    if "embedding" not in (show.get("capabilities") or []):
        raise click.ClickException(f"{model} is not an embedding model (try all-minilm)")
    counter = counter_for(show)
    known: dict[str, dict[str, str]] = {}
    if manifest and manifest.is_file():
        try:
            known = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as exc:
            raise click.ClickException(f"{manifest}: not a corral embed manifest") from exc
    stats = _Stats()
    items = _items(list(paths), tuple(globs) or DEFAULT_GLOBS, tuple(fields) or TEXT_FIELDS, counter, chunk_tokens,
                   overlap, known, stats)
    meta = {"corpus": [str(p) for p in paths], "chunk_tokens": chunk_tokens, "overlap": overlap,
            **parse_pairs(metadata, "metadata")}
    try:
        job = client.submit_stream(
            _buffered(items), content_type="application/x-ndjson",
            params={"kind": "embed", "model": model, "chunk_size": chunk_size, "metadata": meta},
        )
    except CorpusError as exc:
        raise click.ClickException(str(exc)) from exc
    except ClientError as exc:
        if exc.status == 400 and "no items" in exc.message and stats.skipped:
            click.echo(f"nothing to embed: {stats.skipped} files unchanged since the manifest's jobs", err=True)
            return
        raise
    click.echo(job["id"])
    click.echo(f"{stats.files} files, {stats.chunks} chunks submitted; {stats.skipped} unchanged files skipped", err=True)
    if manifest:
        files = dict(known)
        files.update({k: {"sha256": v, "job": job["id"]} for k, v in stats.hashes.items() if known.get(k, {}).get("sha256") != v})
        manifest.write_text(json.dumps({"model": model, "files": files}, indent=1))
    if wait:
        final = watch(client, job["id"], interval)
        sys.exit(EXIT_CODES.get(final["status"], 1))


@click.command()
@click.argument("job_id", metavar="JOB")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 1000), default=5, show_default=True, help="How many chunks.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@with_client
def search(client: CorralClient, job_id: str, query: str, k: int, as_json: bool) -> None:
    """Find the chunks of an embedding job most similar to QUERY."""
    reply = client.request("GET", f"/api/jobs/{job_id}/search", params={"q": query, "k": k})
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    for hit in reply["results"]:
        where = hit.get("metadata", {}).get("source") or hit.get("custom_id") or f"#{hit['index']}"
        snippet = " ".join(str(hit.get("text") or "").split())
        click.echo(f"{hit['score']:.4f}  {where}  {snippet[:160]}")


COMMANDS = [embed, search]
