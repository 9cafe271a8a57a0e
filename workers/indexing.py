"""Indexing a collection's documents on a worker: read the stored File, extract its text, cut it into chunks
counted with the loaded model's own tokenizer, embed the chunks of many documents in shared decodes, and write
each document's result and its new chunks in one transaction (jobs/collection_index.py).

Documents are taken a group at a time, about :data:`GROUP_TOKENS` tokens, so a chunk of large documents is never
held or decoded whole, a job cancelled meanwhile stops between groups, and each group's documents become
searchable as soon as they are embedded.  A document that cannot be read (a deleted File, an unreadable PDF,
binary bytes, past :data:`~jobs.collection_index.MAX_DOCUMENT_CHARS`) fails alone, with its reason; but a
re-embed of a document whose File was deleted since it was indexed embeds its stored chunks' texts instead, so a
model switch never loses a document that is still searchable.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy.orm import Session

from corral.corpus import CorpusError, UnsupportedDocument, chunk_text, extract_text, rejoin
from corral.errors import CorralError
from jobs import transitions
from jobs.collection_index import (
    MAX_DOCUMENT_CHARS,
    IndexedChunk,
    apply_document,
    document_source,
    fail_document,
    finish_reembed,
    stored_chunks,
)
from jobs.db import transaction
from jobs.models import ItemState
from workers.engine import LoadedModel, finish_vectors

log = logging.getLogger(__name__)

GROUP_TOKENS = 32_768  # tokens of chunks embedded between two looks at the job's state and two commits


class ModelTokenCounter:
    """``count(word)`` in the loaded model's tokens (what :func:`corral.corpus.chunk_text` budgets with), cached:
    a corpus repeats its words."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.cache: dict[str, int] = {}

    def count(self, word: str) -> int:
        cached = self.cache.get(word)
        if cached is None:
            cached = max(1, len(self.model.llm.tokenize(word.encode("utf-8"), add_bos=False, special=False)))
            if len(self.cache) < 200_000:
                self.cache[word] = cached
        return cached


@dataclass
class _Prepared:
    item_id: int
    body: dict[str, Any]
    sha256: str
    chunks: list[IndexedChunk]
    tokens: list[list[int]]


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _prepare(session_factory: Callable[[], Session], model: LoadedModel, counter: ModelTokenCounter,
             item_id: int, body: dict[str, Any]) -> _Prepared:
    def read(session: Session) -> tuple[tuple[str, bytes] | None, tuple[str, list[IndexedChunk]] | None]:
        source = document_source(session, str(body["file_id"]))
        return source, (stored_chunks(session, int(body["document_id"])) if source is None and body.get("reembed")
                        else None)

    source, kept = transaction(session_factory, read, f"reading document {body['document_id']}")
    if kept is not None:  # a re-embed of a document whose File is gone: its stored text, cut for the new model
        sha256, old = kept
        return _cut(item_id, body, sha256, rejoin((c.start, c.text) for c in old), model, counter)
    if source is None:
        raise _Refused("invalid_file", f"the File {body['file_id']} was deleted before it was indexed")
    filename, raw = source
    try:
        text = extract_text(body.get("filename") or filename, raw)
    except UnsupportedDocument as exc:
        raise _Refused("unsupported_file", str(exc)) from exc
    except CorpusError as exc:
        raise _Refused("invalid_file", str(exc)) from exc
    if len(text) > MAX_DOCUMENT_CHARS:
        raise _Refused("invalid_file", f"{filename}: {len(text)} characters of text, more than the "
                                       f"{MAX_DOCUMENT_CHARS} a document may have")
    return _cut(item_id, body, hashlib.sha256(raw).hexdigest(), text, model, counter)


def _cut(item_id: int, body: dict[str, Any], sha256: str, text: str, model: LoadedModel,
         counter: ModelTokenCounter) -> _Prepared:
    """``text`` cut into the chunks the item's chunking asks for, as the model counts tokens, and tokenized."""
    pieces = list(chunk_text(text, counter, int(body["chunk_tokens"]), int(body["chunk_overlap"])))
    chunks = [IndexedChunk(n, p.text, p.start, p.end, p.tokens) for n, p in enumerate(pieces)]
    tokens = model.embed_tokens([c.text for c in chunks], truncate=True) if chunks else []
    return _Prepared(item_id, body, sha256, chunks, tokens)


def run_index_items(
    session_factory: Callable[[], Session], model: LoadedModel, claimed: list[tuple[int, dict[str, Any]]],
    attempt: str, job_id: str, stopped: Callable[[], bool],
) -> None:
    """Index the claimed documents, a group at a time; a job stopped meanwhile leaves the rest cancelled."""
    counter = ModelTokenCounter(model)
    index = 0
    while index < len(claimed):
        if index and stopped():
            rest = {item_id: {"state": ItemState.CANCELLED, "error": "the job was stopped before this document ran"}
                    for item_id, _ in claimed[index:]}
            transaction(session_factory, partial(transitions.write_results, attempt=attempt, results=rest),
                        f"cancelling the rest of job {job_id}'s chunk")
            return
        group: list[_Prepared] = []
        refused: list[tuple[int, dict[str, Any], _Refused]] = []
        used = 0
        while index < len(claimed) and (not group or used < GROUP_TOKENS):
            item_id, body = claimed[index]
            index += 1
            try:
                prepared = _prepare(session_factory, model, counter, item_id, body)
            except _Refused as exc:
                refused.append((item_id, body, exc))
                continue
            except CorralError as exc:
                refused.append((item_id, body, _Refused("server_error", exc.message)))
                continue
            group.append(prepared)
            used += sum(len(t) for t in prepared.tokens)
        vectors = None
        if any(p.tokens for p in group):
            try:
                vectors = finish_vectors(model.embed_array([t for p in group for t in p.tokens]),
                                         normalize=True, dimensions=None)
            except CorralError as exc:
                refused.extend((p.item_id, p.body, _Refused("server_error", exc.message)) for p in group)
                group = []
        _write_group(session_factory, attempt, job_id, group, vectors, refused)


def _write_group(session_factory: Callable[[], Session], attempt: str, job_id: str, group: list[_Prepared],
                 vectors: Any, refused: list[tuple[int, dict[str, Any], _Refused]]) -> None:
    """Each document's item result and its chunks (or its failure), all in one transaction; a result whose
    claim no longer holds (the item was re-queued or stopped) is dropped with its chunks.  Retried while the
    database is out of reach (:func:`jobs.db.transaction`): a repeat after a commit whose answer was lost finds
    its results written and their claims gone, and writes nothing twice."""

    def work(session: Session) -> None:
        first = 0
        for prepared in group:
            count = len(prepared.chunks)
            rows = vectors[first:first + count] if vectors is not None and count else None
            first += count
            dims = int(rows.shape[1]) if rows is not None else 0
            n_tokens = sum(len(t) for t in prepared.tokens)
            result = {"state": ItemState.SUCCEEDED, "prompt_tokens": n_tokens, "completion_tokens": 0,
                      "output": {"document_id": prepared.body["document_id"], "chunks": count, "dims": dims,
                                 "sha256": prepared.sha256, "prompt_eval_count": n_tokens}}
            if not transitions.write_result(session, prepared.item_id, attempt, result):
                continue
            applied = apply_document(
                session, job_id=job_id, document_id=int(prepared.body["document_id"]),
                model_digest=str(prepared.body["model_digest"]), sha256=prepared.sha256, chunks=prepared.chunks,
                vectors=rows.astype("<f4").tobytes() if rows is not None else b"", dims=dims,
                reembed=bool(prepared.body.get("reembed")))
            if not applied:
                log.info("document %s of job %s was deleted or re-synced meanwhile; its chunks are dropped",
                         prepared.body["document_id"], job_id)
        for item_id, body, exc in refused:
            if transitions.write_result(session, item_id, attempt, {"state": ItemState.FAILED, "error": exc.message}):
                fail_document(session, job_id=job_id, document_id=int(body["document_id"]), code=exc.code,
                              message=exc.message, reembed=bool(body.get("reembed")))
        reembedding = {str(p.body["collection_id"]) for p in group if p.body.get("reembed")}
        reembedding |= {str(body["collection_id"]) for _, body, _ in refused if body.get("reembed")}
        for collection_id in reembedding:
            finish_reembed(session, collection_id)  # the last group of the job switches the model

    transaction(session_factory, work, f"the results of {len(group) + len(refused)} document(s) of job {job_id}")
