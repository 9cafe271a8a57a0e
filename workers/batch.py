"""Run one chunk of a batch job: claim it, claim each item, run it, write the result exactly once.

Every step is a conditional UPDATE (:mod:`jobs.transitions`), so a duplicated message (Redis redelivery, a
reconciler re-enqueue racing a slow worker) can never run an item twice or overwrite a result:

- the chunk: ``queued -> running`` with a fresh attempt token; a message that loses this race does nothing;
- its items: ``pending -> running`` with the same token; a result is written only while the token matches.

All of a chunk's prompts go into the model's decode loop at once (continuous batching; interactive requests
still take free slots first), unstreamed: each item's text comes in one piece when it ends, so the task thread
sleeps instead of waking per token beside the decode threads.  Each result commits as soon as it is read, so
progress is visible live and a killed worker loses only the chunk's unfinished items, which the reconciler puts
back to ``pending``.

A worker runs at most :data:`~workers.runtime.CHUNKS_PER_WORKER` chunks at a time and does not even fetch
another chunk message meanwhile (:mod:`workers.queue_gate`): the rest of its Celery threads stay free for model
builds, and queued chunks stay in Redis for whichever worker frees up first (interactive requests never wait for
these threads: workers/interactive.py).

A PostgreSQL restart (issue #38) fails no item: each of the runner's transactions is retried while the database is
unreachable (:func:`jobs.db.transaction`, bounded by :data:`~jobs.db.RETRY_SECONDS`), and every one of them is
safe to run again after a commit whose outcome was lost (the claims and result writes of :mod:`jobs.transitions`
find their own repeat already done).  Items keep decoding meanwhile; their results wait in this thread and are
written, each once, when the database answers.  A claim that cannot be made at all gives the chunk's message back
to the reconciler (its marker goes), which re-enqueues it once SQL answers.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import redis
from celery import Celery, Task, shared_task
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from corral.broker import UNREACHABLE
from corral.errors import CorralError
from corral.modelstore.store import ModelRecord
from corral.protocol import CHUNK_TASK, InferenceRequest, chunk_key, job_cancel_key, suspect_key
from corral.rerank import ranked
from corral.thinking import ThinkingSplitter
from corral.toolcalls import split_tool_calls, tool_names
from corral.wire.ollama import ollama_final
from jobs import dedup, dispatch, transitions
from jobs.collection_index import INDEX_KIND
from jobs.db import RETRY_SECONDS, reason, sessions, transaction, unreachable
from jobs.models import ItemState, JobStatus
from jobs.queueing import enqueue_chunks
from jobs.transitions import ClaimedChunk
from workers.decode_loop import SequenceHandle
from workers.engine import LoadedModel, finish_vectors
from workers.execution import tool_family
from workers.indexing import run_index_items
from workers.items import item_request, rerank_fields
from workers.rerank import pairs, score_pairs
from workers.runtime import CHUNKS_PER_WORKER, WorkerRuntime

log = logging.getLogger(__name__)

RERANK_GROUP_PAIRS = 1024  # pairs scored together in a rerank chunk (a line has up to 1,000 documents)


def failure(exc: CorralError) -> dict[str, Any]:
    """An item's failed state; its HTTP status is kept for the OpenAI error file's ``response.status_code``."""
    return {"state": ItemState.FAILED, "error": exc.message, "output": {"status_code": exc.status_code}}


@shared_task(name=CHUNK_TASK, bind=True, acks_late=True, ignore_result=True)
def run_chunk(self: Task, chunk_id: str) -> None:
    """Run the items of one chunk (the message carries nothing but the chunk id)."""
    from workers.tasks import runtime_of

    runtime = runtime_of(self)
    try:
        suspect = bool(runtime.redis.exists(suspect_key(chunk_id)))
    except UNREACHABLE as exc:  # the message came a moment ago; Redis has gone since: the safe side
        log.warning("cannot read whether chunk %s is a suspect (%s); running it alone", chunk_id, exc)
        suspect = True
    if not suspect:
        with runtime.chunk_slots:  # the queue gate keeps this from waiting; the semaphore makes sure
            ChunkRunner(runtime, self.app).run(chunk_id)
        return
    # Its last worker died running it: run it alone (one suspect at a time, all chunk slots held), so if one of
    # its items crashes this worker too, no other chunk's items go down with it.
    with runtime.solo_chunk, ExitStack() as slots:
        for _ in range(CHUNKS_PER_WORKER):
            slots.enter_context(runtime.chunk_slots)
        ChunkRunner(runtime, self.app).run(chunk_id)


def mark_received(runtime: WorkerRuntime, request: Any) -> None:
    """On receipt of a chunk message (Celery's ``task_received``, before the chunk is claimed): write this
    worker's name into the chunk's marker, so that if the worker dies before claiming it the reconciler knows
    the message died with it (the broker would only give it back after the visibility timeout)."""
    if request.name == CHUNK_TASK and request.args:
        runtime.redis.set(chunk_key(str(request.args[0])), runtime.name)


class ChunkRunner:
    """Executes chunks inside a worker process, with the process's loaded models."""

    def __init__(self, runtime: WorkerRuntime, celery: Celery, *, retry_for: float = RETRY_SECONDS) -> None:
        self.runtime = runtime
        self.celery = celery
        self.sessions = sessions(runtime.settings)
        self.retry_for = retry_for

    def _tx(self, what: str, work: Callable[[Session], Any]) -> Any:
        """One transaction of this runner, retried across a database outage (:func:`jobs.db.transaction`)."""
        return transaction(self.sessions, work, what, retry_for=self.retry_for)

    def run(self, chunk_id: str) -> None:
        attempt = uuid.uuid4().hex
        try:
            chunk: ClaimedChunk | None = self._tx(
                f"the claim of chunk {chunk_id}",
                lambda session: transitions.claim_chunk(session, chunk_id, self.runtime.name, attempt))
        except DBAPIError as exc:
            if not unreachable(exc):
                raise
            # Never claimed: the message is acked when this returns, and a marker naming this live worker would
            # keep the reconciler from sending another.  Without one it re-enqueues the chunk once SQL answers.
            log.error("cannot claim chunk %s: the database is unreachable (%s); the reconciler sends it again",
                      chunk_id, reason(exc))
            self._forget_marker(chunk_id)
            return
        if chunk is None:
            log.info("chunk %s is not queued (duplicate delivery or deleted job); nothing to do", chunk_id)
            return
        if chunk.job_status in JobStatus.TERMINAL:
            self._close_chunk(chunk)
            return
        claimed = chunk

        def start(session: Session) -> list[int]:
            transitions.start_job(session, claimed.job_id)
            return transitions.pending_items(session, chunk_id)

        try:
            item_ids: list[int] = self._tx(f"the start of chunk {chunk_id}", start)
        except Exception as exc:
            log.exception("chunk %s could not start; releasing it", chunk_id)
            self._release(chunk, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._run(chunk, item_ids)
        except Exception as exc:  # never leave the chunk `running` while this worker lives on
            log.exception("chunk %s failed; releasing it", chunk_id)
            self._release(chunk, f"{type(exc).__name__}: {exc}")

    def _run(self, chunk: ClaimedChunk, item_ids: list[int]) -> None:
        try:
            record = self.runtime.requests.record_for(chunk.model, chunk.model_digest)
        except CorralError as exc:
            message = f"model unavailable: {exc.message}"
            self._tx(f"failing job {chunk.job_id}", lambda session: transitions.fail_job(session, chunk.job_id, message))
            self._close_chunk(chunk)
            return
        indexing = chunk.kind == INDEX_KIND  # a collection's documents: chunked and embedded here
        embedding, rank = chunk.kind == "embed" or indexing, chunk.kind == "rerank"
        try:
            spec = self.runtime.requests.load_spec(record, chunk.options, embedding=embedding, rank=rank)
        except CorralError as exc:  # a rerank job on a model that is not a reranker: no item can run
            message = exc.message
            self._tx(f"failing job {chunk.job_id}", lambda session: transitions.fail_job(session, chunk.job_id, message))
            self._close_chunk(chunk)
            return
        keep_alive = self.runtime.settings.keep_alive
        with self.runtime.registry.use(spec, record, chunk.model, keep_alive) as (model, _):
            if not self._job_cancelled(chunk.job_id):
                if indexing:
                    run_index_items(self.sessions, model, self._claim(item_ids, chunk.attempt), chunk.attempt,
                                    chunk.job_id, lambda: self._job_cancelled(chunk.job_id))
                elif embedding:
                    self._run_embed_items(model, item_ids, chunk.attempt)
                elif rank:
                    self._run_rerank_items(model, item_ids, chunk)
                else:
                    self._run_generate_items(model, record, item_ids, chunk)
        self._close_chunk(chunk)

    def _release(self, chunk: ClaimedChunk, error: str) -> None:
        """Put the chunk's unfinished items back (failed after their last try) and the chunk in the queue again."""
        try:
            retry = self._tx(f"the release of chunk {chunk.chunk_id}", lambda session: transitions.release_chunk(
                session, chunk.chunk_id, chunk.attempt, chunk.job_id, error))
        except Exception:  # the database stayed away past the retries: the chunk stays running under this worker
            log.exception("chunk %s could not be released; it stays claimed by %s", chunk.chunk_id, self.runtime.name)
            return

        def tell_redis() -> None:
            self.runtime.redis.delete(chunk_key(chunk.chunk_id), suspect_key(chunk.chunk_id))
            if retry:
                enqueue_chunks(self.celery, self.runtime.redis, [(chunk.chunk_id, chunk.model_digest, chunk.job_id)])

        self._after_commit(f"chunk {chunk.chunk_id} released" + (", its message sent again" if retry else ""), tell_redis)

    # -- items ------------------------------------------------------------------------------------------

    def _claim(self, item_ids: list[int], attempt: str) -> list[tuple[int, dict[str, Any]]]:
        claimed: list[tuple[int, dict[str, Any]]] = self._tx(
            f"the claim of {len(item_ids)} item(s)", lambda session: transitions.claim_items(session, item_ids, attempt))
        return claimed

    def _write(self, item_id: int, attempt: str, values: dict[str, Any], copies: list[int] | None = None,
               cache_key: str | None = None) -> None:
        """One item's result, the same result for its deterministic ``copies``, and with ``cache_key`` the
        result cache's entry, in one transaction (retried as a whole: each part is a no-op the second time)."""
        def work(session: Session) -> bool:
            written = transitions.write_result(session, item_id, attempt, values)
            if copies:
                transitions.write_results(session, attempt, dict.fromkeys(copies, values))
            if cache_key is not None:
                dedup.store(session, cache_key, values["output"], values.get("prompt_tokens"), values.get("completion_tokens"))
            return written

        if not self._tx(f"the result of item {item_id}", work):  # a late writer, refused
            log.warning("item %s: result not stored, attempt %s no longer holds it (re-queued while this worker "
                        "was out of reach, or its job stopped)", item_id, attempt)

    def _run_generate_items(
        self, model: LoadedModel, record: ModelRecord, item_ids: list[int], chunk: ClaimedChunk
    ) -> None:
        """Queue every prompt of the chunk in the decode loop, then collect and store them in input order."""
        attempt, job_id, kind, name = chunk.attempt, chunk.job_id, chunk.kind, chunk.model
        options = chunk.options
        running: list[tuple[int, InferenceRequest, SequenceHandle, ThinkingSplitter | None]] = []
        # Deterministic duplicates (jobs/dedup.py) run once: the first of each key runs, the rest take its result.
        copies: dict[int, list[int]] = {}
        keys: dict[int, str] = {}
        first_of: dict[str, int] = {}
        scope = ""  # with the job's cache on, its results go to its owner's cache (jobs/dedup.py cache_key)
        if chunk.cache:
            shared = self.runtime.settings.result_cache_shared
            scope = self._tx(f"the cache scope of job {job_id}", lambda session: dedup.job_cache_scope(session, job_id, shared))
        for item_id, body in self._claim(item_ids, attempt):
            key = dedup.request_key(record.digest, kind, body, options)
            if key is not None:
                if key in first_of:
                    copies[first_of[key]].append(item_id)
                    continue
                first_of[key], keys[item_id], copies[item_id] = item_id, key, []
            req = item_request(record, kind, name, options, body)
            try:
                handle, splitter = self.runtime.requests.start_generation(model, req, interactive=False, stream=False,
                                                                 record=record)
                running.append((item_id, req, handle, splitter))
            except CorralError as exc:
                self._write(item_id, attempt, failure(exc), copies.get(item_id, []))
        stopping = False
        for item_id, req, handle, splitter in running:
            if stopping:
                handle.cancel()
            parts: list[str] = []  # the item's text, handed over in one piece when it ends (not streamed)

            def keep(text: str, parts: list[str] = parts) -> bool:  # bound now: called within this iteration
                parts.append(text)
                return False  # whether to stop is asked of the Redis flag while the item runs (POLL_SECONDS)

            values: dict[str, Any]
            try:
                result = handle.stream(keep, lambda: self._cancel_flagged(job_id))
                if result.done_reason == "cancelled":
                    values = {"state": ItemState.CANCELLED,
                              "error": "the job was stopped (cancelled or expired) while this item was running"}
                else:
                    stats = self.runtime.requests.generation_stats(req, result, record)
                    stats["total_duration"] = stats["prompt_eval_duration"] + stats["eval_duration"]
                    text, thinking = "".join(parts), ""
                    if splitter is not None:  # the reasoning goes to "thinking", as on the sync route
                        thinking, text = (a + b for a, b in zip(splitter.feed(text), splitter.flush()))
                    output = ollama_final(name, kind, stats, text, thinking=thinking,
                                          logprobs=result.logprobs if req.logprobs else None)
                    if req.tools:  # calls wherever they start, in the model's own form, as on the sync route
                        content, calls = split_tool_calls(text, tool_names(req.tools), tool_family(model, record))
                        if calls:
                            output["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                    values = {
                        "state": ItemState.SUCCEEDED,
                        "output": output,
                        "prompt_tokens": stats["prompt_eval_count"],
                        "completion_tokens": stats["eval_count"],
                    }
            except CorralError as exc:
                values = failure(exc)
            except Exception as exc:  # an item's failure never fails the job
                log.exception("item %s failed", item_id)
                values = {"state": ItemState.FAILED, "error": f"{type(exc).__name__}: {exc}", "output": {"status_code": 500}}
            if values["state"] == ItemState.CANCELLED and not stopping:
                stopping = True
                for _, _, other, _ in running:
                    other.cancel()
            cache_key = (dedup.cache_key(keys[item_id], scope)
                         if chunk.cache and item_id in keys and values["state"] == ItemState.SUCCEEDED else None)
            self._write(item_id, attempt, values, copies.get(item_id, []), cache_key)

    def _run_embed_items(self, model: LoadedModel, item_ids: list[int], attempt: str) -> None:
        """Embed a whole chunk at once: claim its items, pack every input into shared decodes, write back.

        Packing many short inputs per ``llama_decode`` is what makes bulk embedding fast; per-item settings
        (``truncate``, ``dimensions``) and per-item failures (an input too long with ``truncate: false``) are
        kept apart, and each result is written only while this attempt's claim holds.
        """
        claimed = self._claim(item_ids, attempt)
        results: dict[int, dict[str, Any]] = {}
        tokens: list[list[int]] = []
        spans: list[tuple[int, int, int, dict[str, Any]]] = []  # (item id, first row, row count, body)
        for item_id, body in claimed:
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            try:
                item_tokens = model.embed_tokens(inputs, truncate=bool(body.get("truncate", True)))
            except CorralError as exc:
                results[item_id] = failure(exc)
                continue
            spans.append((item_id, len(tokens), len(item_tokens), body))
            tokens.extend(item_tokens)
        try:
            array = model.embed_array(tokens) if tokens else None
        except CorralError as exc:
            array = None
            results.update({item_id: failure(exc) for item_id, *_ in spans})
        if array is not None:
            for item_id, first, count, body in spans:
                try:
                    vectors = finish_vectors(array[first : first + count], normalize=True, dimensions=body.get("dimensions"))
                except CorralError as exc:
                    results[item_id] = failure(exc)
                    continue
                n_tokens = sum(len(t) for t in tokens[first : first + count])
                results[item_id] = {
                    "state": ItemState.SUCCEEDED,
                    "embedding": vectors.astype("<f4").tobytes(),
                    "output": {"dims": int(vectors.shape[1]), "count": count, "prompt_eval_count": n_tokens},
                    "prompt_tokens": n_tokens,
                    "completion_tokens": 0,
                }
        self._write_all(attempt, results)

    def _run_rerank_items(self, model: LoadedModel, item_ids: list[int], chunk: ClaimedChunk) -> None:
        """Score a chunk's items, the pairs of many items packed into shared decodes, about
        :data:`RERANK_GROUP_PAIRS` pairs at a time: a chunk of items with a thousand documents each is never
        tokenized whole in memory, and each group's results are written (and visible) as soon as it is scored.

        An item's own failure (a document too long with ``truncate: false``, a malformed line) is its own; a
        job stopped meanwhile leaves the items not yet scored cancelled.
        """
        claimed = self._claim(item_ids, chunk.attempt)
        index = 0
        while index < len(claimed):
            if index and self._job_cancelled(chunk.job_id):  # the flag, then SQL (a flushed Redis lost the flag)
                error = "the job was stopped (cancelled or expired) while this item was waiting to run"
                self._write_all(chunk.attempt, {item_id: {"state": ItemState.CANCELLED, "error": error}
                                                for item_id, _ in claimed[index:]})
                return
            results: dict[int, dict[str, Any]] = {}
            group: list[tuple[int, dict[str, Any], list[list[int]]]] = []
            count = 0
            while index < len(claimed) and count < RERANK_GROUP_PAIRS:
                item_id, body = claimed[index]
                index += 1
                try:
                    query, documents, truncate = rerank_fields(body)
                    group.append((item_id, body, pairs(model, query, documents, truncate=truncate)))
                except CorralError as exc:
                    results[item_id] = failure(exc)
                    continue
                count += len(group[-1][2])
            results.update(self._score_group(model, group))
            self._write_all(chunk.attempt, results)

    @staticmethod
    def _score_group(model: LoadedModel, group: list[tuple[int, dict[str, Any], list[list[int]]]]) -> dict[int, dict[str, Any]]:
        """The results of rerank items whose pairs are built: all their pairs scored together, then ranked per
        item as the sync route ranks them (corral/rerank.py)."""
        try:
            scores = score_pairs(model, [tokens for _, _, item_pairs in group for tokens in item_pairs])
        except CorralError as exc:
            return {item_id: failure(exc) for item_id, _, _ in group}
        results: dict[int, dict[str, Any]] = {}
        first = 0
        for item_id, body, item_pairs in group:
            item_scores, first = scores[first : first + len(item_pairs)], first + len(item_pairs)
            n_tokens = sum(len(tokens) for tokens in item_pairs)
            documents = body["documents"] if body.get("return_documents") else None
            results[item_id] = {
                "state": ItemState.SUCCEEDED,
                "output": {"results": ranked(item_scores, top_n=body.get("top_n"), documents=documents,
                                             document_as_object=True),  # as /v1/rerank answers
                           "prompt_eval_count": n_tokens},
                "prompt_tokens": n_tokens,
                "completion_tokens": 0,
            }
        return results

    def _write_all(self, attempt: str, results: dict[int, dict[str, Any]]) -> None:
        self._tx(f"the results of {len(results)} item(s)", lambda session: transitions.write_results(session, attempt, results))

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _cancel_flagged(self, job_id: str) -> bool:
        """Cheap check for the token loop: cancel() and delete() always set this Redis flag.  The flag is only a
        shortcut (SQL says whether a job stopped, asked between items, and refuses a stopped job's writes), so
        Redis out of reach reads as "not flagged": a Redis outage must not fail the items that are running."""
        try:
            return bool(self.runtime.redis.exists(job_cancel_key(job_id)))
        except redis.RedisError as exc:
            log.warning("cannot read the cancel flag of job %s (%s); SQL decides between items", job_id, exc)
            return False

    def _job_cancelled(self, job_id: str) -> bool:
        """Between items: the flag, then SQL (the truth, also after a flushed Redis lost the flag)."""
        if self._cancel_flagged(job_id):
            return True
        stopped: bool = self._tx(f"whether job {job_id} stopped", lambda session: transitions.job_stopped(session, job_id))
        return stopped

    def _close_chunk(self, chunk: ClaimedChunk) -> None:
        closed = self._tx(f"the close of chunk {chunk.chunk_id}",
                          lambda session: transitions.close_chunk(session, chunk.chunk_id, chunk.attempt, chunk.job_id))
        if not closed:  # taken over while this worker was out of reach: its markers are the new attempt's
            log.warning("chunk %s: not closed, attempt %s no longer holds it (re-queued while this worker was out "
                        "of reach, or its job stopped)", chunk.chunk_id, chunk.attempt)
            return

        def tell_redis() -> None:
            self.runtime.redis.delete(chunk_key(chunk.chunk_id), suspect_key(chunk.chunk_id))
            try:  # its place: the next
                dispatch.send_next(self.sessions, self.celery, self.runtime.redis, chunk.model_digest)
            except DBAPIError as exc:  # the chunk is closed; the reconciler's sweep dispatches held chunks too
                if not unreachable(exc):
                    raise
                log.warning("the database went away (%s) before the next chunk was dispatched; the reconciler "
                            "dispatches it", reason(exc))

        self._after_commit(f"chunk {chunk.chunk_id} closed, the next one dispatched", tell_redis)

    def _forget_marker(self, chunk_id: str) -> None:
        """Drop a chunk's Redis marker (this worker's name since the message came), so that the reconciler takes
        its message for lost and sends it again (only once SQL answers: it reads the chunk from there)."""
        try:
            self.runtime.redis.delete(chunk_key(chunk_id))
        except UNREACHABLE as exc:  # both gone: the marker names this worker, whose restart would free it
            log.warning("cannot drop the marker of chunk %s either (%s)", chunk_id, exc)

    def _after_commit(self, what: str, tell_redis: Callable[[], None]) -> None:
        """The Redis side of a committed change (SQL first, then the message): now, or, with Redis out of reach,
        once it answers again (:meth:`~workers.runtime.WorkerRuntime.when_redis_answers`).  A Redis outage thus
        neither releases a finished chunk (nor counts a try of its items) nor leaves a released one without a
        message for as long as its marker names this live worker; a second message, should the reconciler have
        sent one meanwhile, finds the chunk claimed."""
        try:
            tell_redis()
        except UNREACHABLE as exc:
            log.warning("Redis unreachable (%s: %s): %s once it answers", type(exc).__name__, exc, what)
            self.runtime.when_redis_answers(what, tell_redis)
