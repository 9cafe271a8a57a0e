"""``corral collection``: a folder kept in sync with a collection by real API and worker processes.

Only what changed is embedded again (the second sync's job has exactly the changed files' items), ``full``
deletes what is gone and ``incremental`` never does, a document that cannot be read fails alone with its reason,
and a worker killed mid-sync leaves every document indexed exactly once after a new worker resumes the job.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from corral.corpus import rejoin
from harness.stack import Stack, wait_for
from jobs.db import sessions
from jobs.models import CollectionChunk, CollectionDocument, Item
from tests.helpers import ROCKETS, cli, make_corpus, no_traceback


def _search(base_url: str, store_id: str, query: str, **options: object) -> list[dict]:
    body = {"query": query, "max_num_results": 10, **options}
    r = httpx.post(f"{base_url}/v1/vector_stores/{store_id}/search", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def _items(settings: object, job_id: str) -> int:
    with sessions(settings)() as session:  # type: ignore[arg-type]
        return int(session.scalar(select(func.count()).select_from(Item).where(Item.job_id == job_id)) or 0)


def _sync(base_url: str, name: str, folder: Path, *args: str) -> tuple[dict, str | None]:
    result = cli(base_url, "collection", "sync", name, str(folder), "--interval", "0.2", *args)
    no_traceback(result)
    assert result.exit_code == 0, result.output
    counts = next(line for line in result.stderr.splitlines() if " added, " in line)
    added, updated, skipped, deleted = (int(part.split()[0]) for part in counts.split(", "))
    job = next((line for line in result.stdout.splitlines() if line.startswith("job_")), None)
    return {"added": added, "updated": updated, "skipped": skipped, "deleted": deleted}, job


def test_a_folder_synced_twice_embeds_only_what_changed(stack: Stack, tmp_path: Path) -> None:
    base_url = stack.base_url
    docs = make_corpus(tmp_path)
    created = cli(base_url, "collection", "create", "handbook", "--model", "all-minilm")
    assert created.exit_code == 0, created.output
    store_id = created.stdout.strip()
    assert store_id.startswith("vs_")

    report, job = _sync(base_url, "handbook", docs)
    assert report == {"added": 4, "updated": 0, "skipped": 0, "deleted": 0}  # md, txt, html, jsonl; not the .bin
    assert job is not None and _items(stack.settings, job) == 4
    status = cli(base_url, "status", job)  # the sync is a job like any other
    assert status.exit_code == 0 and "completed" in status.stdout, status.output
    lines = [json.loads(line) for line in cli(base_url, "results", job).stdout.splitlines()]
    assert sorted(line["response"]["chunks"] for line in lines) == [1, 1, 1, 1]
    hits = _search(base_url, store_id, "liquid oxygen and kerosene")
    assert hits[0]["source_id"] == "rockets.md" and hits[0]["score"] > 0
    assert ROCKETS.split(".")[0] in hits[0]["content"][0]["text"]
    assert 0 <= hits[0]["start"] < hits[0]["end"]

    # one file changed, one added, one deleted from the folder: incremental embeds two and deletes nothing
    (docs / "garden.txt").write_text("Peppers like warm nights and a mulch of straw. The code GX-4411 marks them.")
    (docs / "new.md").write_text("Bees visit the clover at dawn.")
    (docs / "sub" / "notes.jsonl").unlink()
    report, job = _sync(base_url, "handbook", docs)
    assert report == {"added": 1, "updated": 1, "skipped": 2, "deleted": 0}
    assert job is not None and _items(stack.settings, job) == 2  # only the changed work ran
    assert any(h["source_id"] == "sub/notes.jsonl" for h in _search(base_url, store_id, "Jupiter largest planet"))
    text_only = {"ranking_options": {"hybrid_search": {"embedding_weight": 0, "text_weight": 1}}}
    exact = _search(base_url, store_id, "GX-4411", **text_only)
    assert [h["source_id"] for h in exact][:1] == ["garden.txt"]
    assert not _search(base_url, store_id, "Tomatoes suckers stake", **text_only)  # the old text is gone

    # full: the deleted file's document goes; nothing is embedded again
    report, job = _sync(base_url, "handbook", docs, "--mode", "full")
    assert report == {"added": 0, "updated": 0, "skipped": 4, "deleted": 1}
    assert job is None
    assert not any(h["source_id"] == "sub/notes.jsonl" for h in _search(base_url, store_id, "Jupiter largest planet"))

    listed = cli(base_url, "collection", "search", "handbook", "kerosene oxygen", "--mode", "hybrid", "-k", "2")
    assert listed.exit_code == 0 and "rockets.md[" in listed.stdout, listed.output


def test_an_unreadable_document_fails_alone_with_its_reason(stack: Stack, tmp_path: Path) -> None:
    base_url = stack.base_url
    docs = make_corpus(tmp_path)
    store_id = cli(base_url, "collection", "create", "with-binary").stdout.strip()
    result = cli(base_url, "collection", "sync", "with-binary", str(docs), "--include", "*")
    no_traceback(result)
    assert result.exit_code == 0, result.output  # the job completes: one item failed, the others indexed
    assert "failed: ignored.bin: " in result.stderr and "binary" in result.stderr
    store = httpx.get(f"{base_url}/v1/vector_stores/{store_id}", timeout=30).json()
    assert store["file_counts"] == {"in_progress": 0, "completed": 4, "failed": 1, "cancelled": 0, "total": 5}
    failed = httpx.get(f"{base_url}/v1/vector_stores/{store_id}/files", params={"filter": "failed"}, timeout=30).json()
    assert [f["last_error"]["code"] for f in failed["data"]] == ["unsupported_file"]


@pytest.mark.slow
def test_a_worker_killed_mid_sync_leaves_every_document_indexed_once(isolated: Stack, tmp_path: Path) -> None:
    first, _ = isolated.start_both()
    base_url = isolated.base_url
    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(24):
        (folder / f"doc{n:02}.md").write_text(f"Document {n}. " + ROCKETS * 3 + f" Its tag is TAG{n:02}.")
    store_id = cli(base_url, "collection", "create", "many").stdout.strip()
    report, job = _sync(base_url, "many", folder, "--no-wait")
    assert report["added"] == 24 and job is not None

    def completed() -> int:
        store = httpx.get(f"{base_url}/v1/vector_stores/{store_id}", timeout=30).json()
        return int(store["file_counts"]["completed"])

    wait_for(lambda: completed() >= 4, 120, "the sync to index some documents", interval=0.1)
    first.stop(signal.SIGKILL)
    assert completed() < 24, "the kill must land mid-sync"
    isolated.start_worker()
    wait_for(lambda: completed() == 24, 180, "the resumed sync to index every document", interval=0.5)

    with sessions(isolated.settings)() as session:
        docs = session.execute(select(CollectionDocument.id, CollectionDocument.chunk_count)
                               .where(CollectionDocument.collection_id == store_id)).all()
        chunks = session.execute(select(CollectionChunk.document_id, CollectionChunk.seq)
                                 .where(CollectionChunk.collection_id == store_id)).all()
    assert len(docs) == 24
    assert len(chunks) == len(set(chunks)) == sum(n for _, n in docs)  # no chunk twice, none missing
    assert {d for d, _ in chunks} == {d for d, _ in docs}
    job_view = httpx.get(f"{base_url}/api/jobs/{job}", timeout=30).json()
    assert job_view["status"] == "completed" and job_view["counts"]["succeeded"] == 24, json.dumps(job_view)
    tagged = _search(base_url, store_id, "TAG07", ranking_options={"hybrid_search": {"embedding_weight": 0,
                                                                                     "text_weight": 1}})
    assert tagged and tagged[0]["source_id"] == "doc07.md"


def test_reembed_builds_the_new_vectors_beside_the_old_and_switches_at_once(stack: Stack, tmp_path: Path) -> None:
    base_url = stack.base_url
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "rockets.md").write_text(ROCKETS)
    (folder / "bread.md").write_text("Sourdough bread needs a lively starter and a long, cool rise.")
    store_id = cli(base_url, "collection", "create", "switching").stdout.strip()
    _sync(base_url, "switching", folder)
    before = _search(base_url, store_id, "kerosene rocket launch")
    assert before[0]["source_id"] == "rockets.md"
    result = cli(base_url, "collection", "reembed", "switching", "--model", "smollm2:135m")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    store = httpx.get(f"{base_url}/v1/vector_stores/{store_id}", timeout=30).json()
    assert store["model"] == "smollm2:135m" and "reembed" not in store
    assert store["file_counts"]["completed"] == 2
    with sessions(stack.settings)() as session:
        digests = set(session.scalars(select(CollectionChunk.model_digest)
                                      .where(CollectionChunk.collection_id == store_id)))
    assert len(digests) == 1  # the old vectors are gone with the switch
    after = _search(base_url, store_id, "kerosene rocket launch")
    assert {h["source_id"] for h in after} == {"rockets.md", "bread.md"}
    refused = httpx.post(f"{base_url}/v1/vector_stores/{store_id}/reembed", json={"model": "tiny-model-none"}, timeout=30)
    assert refused.status_code == 404, refused.text


def test_reembed_of_a_document_whose_file_was_deleted_embeds_its_stored_chunks(stack: Stack, tmp_path: Path) -> None:
    """Deleting a File leaves its document searchable (as in OpenAI); a model switch must not lose it either."""
    base_url = stack.base_url
    folder = tmp_path / "orphaned"
    folder.mkdir()
    (folder / "rockets.md").write_text(ROCKETS)
    (folder / "bread.md").write_text("Sourdough bread needs a lively starter and a long, cool rise.")
    store_id = cli(base_url, "collection", "create", "orphaned").stdout.strip()
    _sync(base_url, "orphaned", folder)
    listed = httpx.get(f"{base_url}/v1/vector_stores/{store_id}/files", timeout=30).json()["data"]
    with sessions(stack.settings)() as session:
        rockets = session.scalar(select(CollectionDocument).where(CollectionDocument.collection_id == store_id,
                                                                  CollectionDocument.source_id == "rockets.md"))
        assert rockets is not None
        file_id, texts = rockets.file_id, list(session.execute(
            select(CollectionChunk.start, CollectionChunk.text).where(CollectionChunk.document_id == rockets.id)))
    assert file_id in {f["id"] for f in listed}
    assert httpx.delete(f"{base_url}/v1/files/{file_id}", timeout=30).json()["deleted"] is True
    result = cli(base_url, "collection", "reembed", "orphaned", "--model", "smollm2:135m")
    no_traceback(result)
    assert result.exit_code == 0, result.output
    store = httpx.get(f"{base_url}/v1/vector_stores/{store_id}", timeout=30).json()
    assert store["model"] == "smollm2:135m"
    assert (store["file_counts"]["completed"], store["file_counts"]["failed"]) == (2, 0)
    with sessions(stack.settings)() as session:
        kept = list(session.execute(select(CollectionChunk.start, CollectionChunk.text)
                                    .where(CollectionChunk.document_id == rockets.id)))
    # the same text, at the same offsets, cut for the new model (whose tokens the chunks count), under its vectors
    assert rejoin((start, text) for start, text in kept) == rejoin((start, text) for start, text in texts)
    hits = _search(base_url, store_id, "kerosene rocket launch", ranking_options={
        "hybrid_search": {"embedding_weight": 0, "text_weight": 1}})
    assert hits and hits[0]["source_id"] == "rockets.md"


def test_the_docs_langchain_retriever_retrieves_from_a_collection(stack: Stack, tmp_path: Path) -> None:
    """docs/collections.md's LangChain example, run as written against a collection."""
    base_url = stack.base_url
    store_id = cli(base_url, "collection", "create", "for-langchain").stdout.strip()
    docs = make_corpus(tmp_path)
    _sync(base_url, "for-langchain", docs)
    page = (Path(__file__).resolve().parents[2] / "docs" / "collections.md").read_text()
    code = page.split("<!-- langchain-example -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = code.replace("http://localhost:11434", base_url).replace('"vs_..."', repr(store_id))
    code = code.replace("how do I return an order?", "which planet is the largest?")
    scope: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(code, "docs/collections.md", "exec", dont_inherit=True), scope)  # as a user runs it
    found = scope["docs"]
    assert isinstance(found, list) and found
    assert found[0].metadata["filename"] == "sub/notes.jsonl" and "Jupiter" in found[0].page_content
