"""Turn a folder of documents into embedding-job items: walk, extract text, split into token-aware chunks.

``corral embed`` streams the items straight into the upload, one document at a time, so a corpus of any size
needs memory for one document only.  Chunk sizes are counted in the model's own tokens (corral/corpus.py).
Each chunk keeps its source path, chunk index, character offsets into the extracted text and the file's content
hash as metadata.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.corpus import DEFAULT_GLOBS, TEXT_FIELDS, CorpusError, extract_text, json_texts

# re-exported: the client's chunking is the shared one
from corral.corpus import Chunk as Chunk
from corral.corpus import EstimateCounter as EstimateCounter
from corral.corpus import WordPieceCounter as WordPieceCounter
from corral.corpus import chunk_text as chunk_text
from corral.corpus import counter_for as counter_for
from corral.corpus import html_text as html_text


@dataclass(frozen=True)
class Document:
    source: str  # path relative to the root given, plus "#line" for JSONL records
    text: str
    sha256: str


def documents(path: Path, root: Path, fields: tuple[str, ...] = TEXT_FIELDS) -> Iterator[Document]:
    """The documents in one file (a JSONL file holds one per line; the rest, one each, read by
    :func:`corral.corpus.extract_text`)."""
    rel = os.path.relpath(path, root) if path != root else path.name
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if line.strip():
                try:
                    yield Document(f"{rel}#{number}", json_texts(json.loads(line), fields), digest)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{rel} line {number}: not valid JSON ({exc.msg})") from exc
        return
    try:
        yield Document(rel, extract_text(path.name, raw, fields), digest)
    except CorpusError as exc:
        raise CorpusError(str(exc).replace(path.name, rel, 1)) from exc


def walk(paths: Iterable[Path], globs: tuple[str, ...] = DEFAULT_GLOBS) -> Iterator[tuple[Path, Path]]:
    """(file, root) for every matching file under ``paths``, in a stable order."""
    for given in paths:
        if given.is_file():
            yield given, given.parent
            continue
        if not given.is_dir():
            raise CorpusError(f"{given}: no such file or directory")
        for folder, dirs, files in os.walk(given):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if any(fnmatch.fnmatch(name, g) for g in globs):
                    yield Path(folder) / name, given
