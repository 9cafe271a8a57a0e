"""The Vector Stores API end to end, driven by the unmodified openai SDK against the session's stack.

One store is built once for the module (a Markdown and an HTML file through ``files.upload_and_poll``, three text
files and an unsupported binary through ``file_batches.upload_and_poll``: the worker's ``index`` jobs chunk and
embed them with all-minilm), then read, searched every way the API offers, and taken apart.  The SDK parses every
reply into its own types, so a field of the wrong shape fails here.  Another key's view of a store is checked
through an in-process app with keys required, over the same database (the SDK's own HTTP client, on httpx's WSGI transport).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai import OpenAI

from api import create_app
from corral.settings import Settings
from jobs.keys import KeyStore

SMALL: Any = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20}}
MARKDOWN = ("# Return policy\n\nItems may be returned within 30 days of purchase. Refunds go back to the original "
            "payment method once the parcel reaches our warehouse.\n")
HTML = ("<html><head><title>Versand</title><script>var x = 1;</script></head><body><h1>Shipping</h1>"
        "<p>Parcels ship within three to five business days. Express delivery arrives overnight.</p></body></html>")
TEXTS = {
    "quota.txt": "The storage node reports ERR_7731 when a tenant exceeds the disk quota of its volume.",
    "pandas.txt": "Giant pandas are bears native to the mountains of central China; they eat mostly bamboo.",
    "tower.txt": "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
}
TEXT_ONLY: dict[str, Any] = {"hybrid_search": {"embedding_weight": 0, "text_weight": 1}}


@pytest.fixture(scope="module")
def oai(base_url: str) -> Iterator[OpenAI]:
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def built(oai: OpenAI) -> Iterator[dict[str, Any]]:
    """The module's store: {store, files: {name: file id}, batch} (the store is deleted by its own test)."""
    store = oai.vector_stores.create(name="handbook", chunking_strategy=SMALL, metadata={"team": "docs"})
    files: dict[str, str] = {}
    md = oai.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("policy.md", MARKDOWN.encode()), poll_interval_ms=200,
        attributes={"lang": "en", "kind": "md", "year": 2021})
    html = oai.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("shipping.html", HTML.encode()), poll_interval_ms=200,
        attributes={"lang": "en", "kind": "html", "year": 2024})
    files.update({"policy.md": md.id, "shipping.html": html.id})
    assert (md.status, md.last_error, html.status) == ("completed", None, "completed"), (md, html)
    batch = oai.vector_stores.file_batches.upload_and_poll(
        store.id, files=[(name, text.encode()) for name, text in TEXTS.items()]
        + [("blob.bin", bytes(range(256)) * 8)], poll_interval_ms=200)
    names = {f.id: f.filename for f in oai.files.list()}
    for listed in oai.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id):
        files[names[listed.id]] = listed.id
    yield {"store": store, "files": files, "batch": batch}
    try:
        oai.vector_stores.delete(store.id)
    except openai.NotFoundError:
        pass


def test_files_and_the_batch_reach_terminal_states(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files, batch = built["store"], built["files"], built["batch"]
    assert set(files) == {"policy.md", "shipping.html", *TEXTS, "blob.bin"}
    assert batch.object == "vector_store.files_batch" and batch.status == "completed"
    assert (batch.file_counts.completed, batch.file_counts.failed, batch.file_counts.in_progress) == (3, 1, 0)
    failed = oai.vector_stores.files.retrieve(files["blob.bin"], vector_store_id=store.id)
    assert failed.status == "failed" and failed.last_error is not None
    assert failed.last_error.code in ("unsupported_file", "invalid_file") and failed.last_error.message
    again = oai.vector_stores.retrieve(store.id)
    assert again.status == "completed" and again.name == "handbook" and again.metadata == {"team": "docs"}
    assert (again.file_counts.completed, again.file_counts.failed, again.file_counts.total) == (5, 1, 6)
    assert again.usage_bytes > 0
    assert store.id in [s.id for s in oai.vector_stores.list(limit=100)]


def test_listing_pages_through_every_file(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    walked = [f.id for f in oai.vector_stores.files.list(store.id, limit=1)]  # the SDK follows `after`
    assert sorted(walked) == sorted(files.values()) and len(walked) == len(set(walked))
    oldest_first = [f.id for f in oai.vector_stores.files.list(store.id, limit=2, order="asc")]
    assert oldest_first == walked[::-1]
    failed = [f.id for f in oai.vector_stores.files.list(store.id, filter="failed")]
    assert failed == [files["blob.bin"]]


def test_retrieve_update_and_content(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    got = oai.vector_stores.files.retrieve(files["policy.md"], vector_store_id=store.id)
    assert (got.object, got.vector_store_id, got.attributes) == ("vector_store.file", store.id,
                                                                 {"lang": "en", "kind": "md", "year": 2021})
    assert got.chunking_strategy is not None and got.chunking_strategy.type == "static"
    for name, lang in (("quota.txt", "en"), ("pandas.txt", "en"), ("tower.txt", "fr")):
        updated = oai.vector_stores.files.update(files[name], vector_store_id=store.id,
                                                 attributes={"lang": lang, "kind": "txt", "year": 2020})
        assert updated.attributes == {"lang": lang, "kind": "txt", "year": 2020}
    text = "".join(part.text or "" for part in oai.vector_stores.files.content(files["shipping.html"],
                                                                                vector_store_id=store.id))
    assert "three to five business days" in text and "var x" not in text


def search(oai: OpenAI, store_id: str, query: str | list[str], **body: Any) -> list[Any]:
    page = oai.vector_stores.search(store_id, query=query, **body)
    hits = list(page.data)
    assert all(0.0 <= hit.score <= 1.0 for hit in hits)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    return hits


def test_search_with_filters(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    french = search(oai, store.id, "a famous tower", filters={"key": "lang", "type": "eq", "value": "fr"})
    assert {hit.file_id for hit in french} == {files["tower.txt"]}
    assert french[0].filename == "tower.txt" and french[0].attributes == {"lang": "fr", "kind": "txt", "year": 2020}
    either = search(oai, store.id, "how long does it take", max_num_results=50, filters={"type": "or", "filters": [
        {"key": "kind", "type": "eq", "value": "md"}, {"key": "year", "type": "gte", "value": 2024}]})
    assert {hit.file_id for hit in either} == {files["policy.md"], files["shipping.html"]}
    none = search(oai, store.id, "tower", filters={"key": "year", "type": "gt", "value": 3000})
    assert none == []


def test_a_text_only_search_finds_an_exact_identifier(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    hits = search(oai, store.id, "ERR_7731", ranking_options=TEXT_ONLY)
    assert [hit.file_id for hit in hits] == [files["quota.txt"]]
    hit = hits[0]
    assert "ERR_7731" in hit.content[0].text and hit.content[0].type == "text"
    extras = hit.model_extra or {}
    assert extras["source_id"] == files["quota.txt"] and extras["chunk_index"] == 0
    assert 0 <= extras["start"] < extras["end"]


def test_hybrid_search_ranks_the_answer_first(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    page = oai.vector_stores.search(store.id, query=["which animals eat bamboo", "pandas"], max_num_results=3)
    assert (page.model_extra or {})["search_query"] == ["which animals eat bamboo", "pandas"]
    assert page.data[0].file_id == files["pandas.txt"] and len(page.data) <= 3
    tuned = search(oai, store.id, "Paris landmark", ranking_options={
        "hybrid_search": {"embedding_weight": 0.7, "text_weight": 0.3}, "score_threshold": 0.2})
    assert tuned and tuned[0].file_id == files["tower.txt"] and all(hit.score >= 0.2 for hit in tuned)


def test_a_rerank_model_as_ranker(oai: OpenAI, built: dict[str, Any], reranker: tuple[str, Any]) -> None:
    store = built["store"]
    hits = search(oai, store.id, "refunds for returned items", max_num_results=4,
                  ranking_options={"ranker": reranker[0]})
    assert 0 < len(hits) <= 4 and len({hit.score for hit in hits}) > 1  # rescored, not the fused ranks


def test_a_deleted_file_is_no_longer_found(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    assert search(oai, store.id, "ERR_7731", ranking_options=TEXT_ONLY)
    deleted = oai.vector_stores.files.delete(files["quota.txt"], vector_store_id=store.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (files["quota.txt"], "vector_store.file.deleted", True)
    assert search(oai, store.id, "ERR_7731", ranking_options=TEXT_ONLY) == []
    assert oai.files.retrieve(files["quota.txt"]).id == files["quota.txt"]  # the File itself stays
    with pytest.raises(openai.NotFoundError):
        oai.vector_stores.files.retrieve(files["quota.txt"], vector_store_id=store.id)


def test_another_keys_store_is_a_404(settings: Settings) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    app = create_app(keyed)  # in-process, over the session's database: a server of its own costs seconds

    def client(name: str) -> OpenAI:
        return OpenAI(base_url="http://127.0.0.1/v1", api_key=KeyStore(keyed).create(name)[0], max_retries=0,
                      http_client=openai.DefaultHttpxClient(transport=httpx2.WSGITransport(app=app)))

    mine, theirs = client("vs-mine"), client("vs-theirs")
    with mine, theirs:
        store = mine.vector_stores.create(name="private")
        with pytest.raises(openai.NotFoundError):
            theirs.vector_stores.retrieve(store.id)
        with pytest.raises(openai.NotFoundError):
            theirs.vector_stores.search(store.id, query="x", ranking_options=TEXT_ONLY)  # type: ignore[arg-type]
        assert store.id not in [s.id for s in theirs.vector_stores.list()]
        assert mine.vector_stores.retrieve(store.id).name == "private"
        mine.vector_stores.delete(store.id)


def test_deleting_the_store(oai: OpenAI, built: dict[str, Any]) -> None:
    store, files = built["store"], built["files"]
    deleted = oai.vector_stores.delete(store.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (store.id, "vector_store.deleted", True)
    with pytest.raises(openai.NotFoundError):
        oai.vector_stores.retrieve(store.id)
    with pytest.raises(openai.NotFoundError):
        oai.vector_stores.search(store.id, query="pandas")
    assert oai.files.retrieve(files["pandas.txt"]).id == files["pandas.txt"]
