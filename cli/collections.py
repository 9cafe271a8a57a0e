"""``corral collection``: named corpora on the server, kept in sync with a folder, searched hybrid and reranked.

The CLI reads the folder (the server never reads a client's path): it hashes every file, asks the server which
ones it lacks (``POST /v1/vector_stores/{id}/sync`` without Files), uploads only those as Files, and sends the
sync again with their File ids.  The server indexes them as one durable job; ``--wait`` follows it.  Everything
else goes through the OpenAI Vector Stores routes, so what the CLI does an app can do with the openai SDK.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from cli.client import ClientError, CorralClient
from cli.common import parse_pairs, with_client
from cli.jobs import EXIT_CODES, watch
from corral.corpus import DEFAULT_GLOBS

SYNC_BATCH = 100_000  # documents one sync may name (the server's bound; about 15 MB of JSON)


def resolve(client: CorralClient, name: str) -> dict[str, Any]:
    """The store named NAME (or with the id ``vs_...``) among the key's stores."""
    if name.startswith("vs_"):
        store: dict[str, Any] = client.request("GET", f"/v1/vector_stores/{name}")
        return store
    after: str | None = None
    found: list[dict[str, Any]] = []
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = client.request("GET", "/v1/vector_stores", params=params)
        found.extend(s for s in page["data"] if s.get("name") == name)
        if not page.get("has_more"):
            break
        after = page["last_id"]
    if not found:
        raise click.ClickException(f"no collection named {name!r} (corral collection create {name})")
    if len(found) > 1:
        raise click.ClickException(f"{len(found)} collections are named {name!r}; give an id: "
                                   + ", ".join(s["id"] for s in found))
    return found[0]


def _files(root: Path, includes: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """(source id: the path relative to ROOT, with /), for each file that matches, in a stable order."""
    if root.is_file():
        yield root.name, root
        return
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in includes):
                yield rel, path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@click.group()
def collection() -> None:
    """Named collections of documents: sync a folder, search it (vector, keyword, hybrid, reranked)."""


@collection.command()
@click.argument("name")
@click.option("--model", default="all-minilm", show_default=True, help="The embedding model of its vectors.")
@click.option("--chunk-tokens", type=click.IntRange(100, 4096), help="Tokens per chunk (default: OpenAI's auto, 800 "
              "cut to the model's context).")
@click.option("--overlap", type=click.IntRange(0, 2048), help="Tokens shared by neighbouring chunks (at most half).")
@click.option("--expires-days", type=click.IntRange(1, 365), help="Delete after this many days without use.")
@with_client
def create(client: CorralClient, name: str, model: str, chunk_tokens: int | None, overlap: int | None,
           expires_days: int | None) -> None:
    """Create the collection NAME."""
    body: dict[str, Any] = {"name": name, "model": model}
    if chunk_tokens is not None:
        body["chunking_strategy"] = {"type": "static", "static": {
            "max_chunk_size_tokens": chunk_tokens, "chunk_overlap_tokens": overlap if overlap is not None else chunk_tokens // 2}}
    if expires_days:
        body["expires_after"] = {"anchor": "last_active_at", "days": expires_days}
    try:
        resolve(client, name)
    except click.ClickException:
        pass
    else:
        raise click.ClickException(f"a collection named {name!r} exists already")
    store = client.request("POST", "/v1/vector_stores", json=body)
    click.echo(store["id"])


@collection.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the stores as JSON.")
@with_client
def list_(client: CorralClient, as_json: bool) -> None:
    """The key's collections."""
    page = client.request("GET", "/v1/vector_stores", params={"limit": 100})
    if as_json:
        click.echo(json.dumps(page["data"], indent=2))
        return
    for store in page["data"]:
        counts = store["file_counts"]
        click.echo(f"{store['id']}  {store['name'] or '-':20}  {store.get('model', ''):20}  {store['status']:11}  "
                   f"{counts['completed']}/{counts['total']} documents, {counts['failed']} failed")


@collection.command()
@click.argument("name")
@with_client
def show(client: CorralClient, name: str) -> None:
    """A collection's state, and its documents that failed, with their reasons."""
    store = resolve(client, name)
    click.echo(json.dumps(store, indent=2))
    failed = client.request("GET", f"/v1/vector_stores/{store['id']}/files", params={"filter": "failed", "limit": 100})
    for doc in failed["data"]:
        click.echo(f"failed: {doc.get('source_id') or doc['id']}: {(doc.get('last_error') or {}).get('message')}")


@collection.command()
@click.argument("name")
@with_client
def delete(client: CorralClient, name: str) -> None:
    """Delete a collection: its documents, chunks and vectors (uploaded Files stay)."""
    store = resolve(client, name)
    client.request("DELETE", f"/v1/vector_stores/{store['id']}")
    click.echo(f"deleted {store['id']}")


@collection.command()
@click.argument("name")
@click.argument("directory", type=click.Path(exists=True, file_okay=True, path_type=Path))
@click.option("--mode", type=click.Choice(["incremental", "full"]), default="incremental", show_default=True,
              help="full also deletes the documents gone from DIRECTORY; incremental never deletes.")
@click.option("--include", "includes", multiple=True, metavar="GLOB",
              help="Files to take (repeatable; default: text, Markdown, HTML, JSON and PDF).")
@click.option("--attribute", "attributes", multiple=True, metavar="KEY=VALUE",
              help="An attribute every synced document gets (filters test it).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the indexing job to its end.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between polls.")
@with_client
def sync(client: CorralClient, name: str, directory: Path, mode: str, includes: tuple[str, ...],
         attributes: tuple[str, ...], wait: bool, interval: float) -> None:
    """Bring collection NAME to DIRECTORY's state: only new and changed files are uploaded and embedded."""
    store = resolve(client, name)
    attrs = parse_pairs(attributes, "attribute") or None
    files = {sid: path for sid, path in _files(directory, includes or DEFAULT_GLOBS)}
    hashes = {sid: _sha256(path) for sid, path in files.items()}
    if len(files) > SYNC_BATCH:
        raise click.ClickException(f"{len(files)} files: a sync takes at most {SYNC_BATCH}; sync sub-folders")
    documents = [{"source_id": sid, "sha256": digest, **({"attributes": attrs} if attrs else {})}
                 for sid, digest in hashes.items()]
    path = f"/v1/vector_stores/{store['id']}/sync"
    plan = client.request("POST", path, json={"mode": mode, "documents": documents}, timeout=300)
    needed = set(plan.get("needed") or [])
    if needed:
        uploaded = _upload(client, {sid: files[sid] for sid in sorted(needed)})
        for doc in documents:
            if doc["source_id"] in uploaded:
                doc["file_id"] = uploaded[doc["source_id"]]
        plan = client.request("POST", path, json={"mode": mode, "documents": documents}, timeout=300)
    click.echo(f"{plan['added']} added, {plan['updated']} updated, {plan['skipped']} unchanged, "
               f"{plan['deleted']} deleted", err=True)
    job_id = plan.get("job_id")
    if job_id:
        click.echo(job_id)
    if wait and job_id and plan.get("status") == "in_progress":
        final = watch(client, job_id, interval)
        failed = client.request("GET", f"/v1/vector_stores/{store['id']}/files", params={"filter": "failed", "limit": 100})
        for doc in failed["data"]:
            click.echo(f"failed: {doc.get('source_id') or doc['id']}: {(doc.get('last_error') or {}).get('message')}",
                       err=True)
        sys.exit(EXIT_CODES.get(final["status"], 1))


def _upload(client: CorralClient, files: dict[str, Path]) -> dict[str, str]:
    """Upload each file as an OpenAI File (purpose ``assistants``); {source id: File id}."""
    out: dict[str, str] = {}
    columns = (TextColumn("uploading"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"))
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("", total=len(files))
        for sid, path in files.items():
            progress.update(task, description=sid[-60:])
            with path.open("rb") as handle:
                try:
                    reply = client.request("POST", "/v1/files", data={"purpose": "assistants"},
                                           files={"file": (path.name, handle)}, timeout=300)
                except ClientError as exc:
                    raise click.ClickException(f"{sid}: upload failed: {exc.message}") from exc
            out[sid] = reply["id"]
            progress.advance(task)
    return out


@collection.command()
@click.argument("name")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 50), default=5, show_default=True, help="How many hits.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="Only documents whose attribute "
              "KEY equals VALUE (repeatable: all must hold).")
@click.option("--mode", type=click.Choice(["vector", "text", "hybrid"]), default="hybrid", show_default=True)
@click.option("--rerank", "reranker", metavar="MODEL", help="Rescore the best candidates with this reranker.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@with_client
def search(client: CorralClient, name: str, query: str, k: int, filters: tuple[str, ...], mode: str,
           reranker: str | None, as_json: bool) -> None:
    """Search collection NAME: ranked chunks with their source and character offsets."""
    store = resolve(client, name)
    weights = {"vector": (1.0, 0.0), "text": (0.0, 1.0), "hybrid": (1.0, 1.0)}[mode]
    body: dict[str, Any] = {"query": query, "max_num_results": k, "ranking_options": {
        "ranker": reranker or "none",
        "hybrid_search": {"embedding_weight": weights[0], "text_weight": weights[1]}}}
    pairs = parse_pairs(filters, "filter")
    if pairs:
        comparisons = [{"type": "eq", "key": key, "value": value} for key, value in pairs.items()]
        body["filters"] = comparisons[0] if len(comparisons) == 1 else {"type": "and", "filters": comparisons}
    reply = client.request("POST", f"/v1/vector_stores/{store['id']}/search", json=body, timeout=120)
    if as_json:
        click.echo(json.dumps(reply, indent=2, ensure_ascii=False))
        return
    for hit in reply["data"]:
        where = hit.get("source_id") or hit.get("filename") or hit["file_id"]
        span = f"[{hit['start']}:{hit['end']}]" if "start" in hit else ""
        text = " ".join(" ".join(c.get("text", "") for c in hit.get("content") or []).split())
        click.echo(f"{hit['score']:.4f}  {where}{span}  {text[:160]}")


@collection.command()
@click.argument("name")
@click.option("--model", required=True, help="The embedding model of the new vectors.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the job to its end.")
@with_client
def reembed(client: CorralClient, name: str, model: str, wait: bool) -> None:
    """Embed every document again with MODEL beside the current vectors, then switch to them at once."""
    store = resolve(client, name)
    reply = client.request("POST", f"/v1/vector_stores/{store['id']}/reembed", json={"model": model})
    click.echo(reply.get("job_id") or "nothing to re-embed")
    if wait and reply.get("job_id"):
        final = watch(client, reply["job_id"], 1.0)
        sys.exit(EXIT_CODES.get(final["status"], 1))


COMMANDS = [collection]
