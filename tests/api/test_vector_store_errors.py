"""Bad input to the Vector Stores API (issue #37 item 8 and OpenAI's wire limits), on the in-process app.

Everything here is answered before work is queued (no Redis in this tier): each bad body or query is a 400 in
OpenAI's error shape naming the parameter, an unknown or another key's store is a 404, and a store whose model is
gone or changed refuses a search with a 409.  Nothing stored changes on the way: the store reads the same after.
A text-only search (embedding_weight 0) needs no worker, so the happy path of the search view runs here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import insert, select

from api import create_app
from api.services import services
from corral.errors import ModelNotFound
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from jobs import collection_search
from jobs.collection_index import finish_reembed
from jobs.db import sessions
from jobs.keys import KeyStore
from jobs.models import Collection, CollectionChunk, CollectionDocument

STATIC = {"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 50}}
TEXT_ONLY = {"hybrid_search": {"embedding_weight": 0, "text_weight": 1}}


def static(size: int, overlap: int) -> dict[str, Any]:
    return {"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}}


def refused(reply: Any, status: int = 400, param: str | None = None) -> dict[str, Any]:
    """The reply is OpenAI's error object with ``status`` (and ``param`` when given); its ``error``."""
    assert reply.status_code == status, reply.get_data(as_text=True)
    body = reply.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error"}.get(status,
                                                                                             body["error"]["type"])
    if param is not None:
        assert body["error"]["param"] == param, body
    error: dict[str, Any] = body["error"]
    return error


@pytest.fixture(scope="module")
def client(settings: Settings) -> FlaskClient:
    """One app for the module (the tier's per-test app costs more than most of these requests)."""
    return create_app(settings).test_client()


@pytest.fixture(scope="module")
def store(client: FlaskClient) -> Iterator[str]:
    r = client.post("/v1/vector_stores", json={"name": "errors", "metadata": {"team": "docs"}})
    assert r.status_code == 200, r.get_data(as_text=True)
    store_id: str = r.get_json()["id"]
    yield store_id
    client.delete(f"/v1/vector_stores/{store_id}")


def search(client: FlaskClient, store_id: str, **body: Any) -> Any:
    return client.post(f"/v1/vector_stores/{store_id}/search", json={"query": "anything", **body})


def test_a_new_store_reads_in_openais_shape(client: FlaskClient, store: str) -> None:
    got = client.get(f"/v1/vector_stores/{store}", headers={"OpenAI-Beta": "assistants=v2"}).get_json()
    assert got["object"] == "vector_store" and got["id"].startswith("vs_") and got["name"] == "errors"
    assert got["file_counts"] == {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0, "total": 0}
    assert got["status"] == "completed" and got["metadata"] == {"team": "docs"} and got["model"] == "all-minilm"


@pytest.mark.parametrize("n", [0, 51, -1, "ten"])
def test_max_num_results_outside_1_to_50(client: FlaskClient, store: str, n: Any) -> None:
    refused(search(client, store, max_num_results=n), param="max_num_results")


@pytest.mark.parametrize(("filters", "param"), [
    ({"type": "eq", "value": "en"}, "filters.key"),
    ({"key": "", "type": "eq", "value": "en"}, "filters.key"),
    ({"key": "lang", "type": "eq"}, "filters.value"),
    ({"key": "year", "type": "gt", "value": "2020"}, "filters.value"),
    ({"key": "year", "type": "lte", "value": True}, "filters.value"),
    ({"key": "lang", "type": "in", "value": "en"}, "filters.value"),
    ({"key": "lang", "type": "nin", "value": [{"a": 1}]}, "filters.value"),
    ({"key": "lang", "type": "eq", "value": ["en", "de"]}, "filters.value"),
    ({"key": "lang", "type": "eq", "value": None}, "filters.value"),
    ({"key": "lang", "type": "like", "value": "en"}, "filters.type"),
    ({"type": "xor", "filters": []}, "filters.type"),
    ({"type": "and", "filters": []}, "filters.filters"),
    ({"type": "or", "filters": [{"key": "a", "value": 1}, {"key": "b", "type": "gt", "value": "x"}]},
     "filters.filters[1].value"),
    ({"type": "and", "filters": [{"type": "or", "filters": [{"value": 1}]}]}, "filters.filters[0].filters[0].key"),
    ({"key": "lang", "value": "en", "extra": 1}, "filters"),
    ("lang = en", "filters"),
])
def test_bad_filters_name_the_parameter(client: FlaskClient, store: str, filters: Any, param: str) -> None:
    refused(search(client, store, filters=filters), param=param)


def test_filters_nested_too_deep_are_refused(client: FlaskClient, store: str) -> None:
    node: dict[str, Any] = {"key": "a", "value": 1}
    for _ in range(12):
        node = {"type": "and", "filters": [node]}
    refused(search(client, store, filters=node))


@pytest.mark.parametrize(("body", "param"), [
    ({"query": []}, "query"),
    ({"query": ""}, "query"),
    ({"query": ["ok", "  "]}, "query"),
    ({"query": [f"q{i}" for i in range(11)]}, "query"),
    ({}, "query"),
    ({"query": "x", "rank": "auto"}, "rank"),
    ({"query": "x", "ranking_options": {"score_threshold": 1.5}}, "ranking_options.score_threshold"),
    ({"query": "x", "ranking_options": {"score_threshold": -0.1}}, "ranking_options.score_threshold"),
    ({"query": "x", "ranking_options": {"ranker": ""}}, "ranking_options.ranker"),
    ({"query": "x", "ranking_options": {"hybrid_search": {"embedding_weight": 0, "text_weight": 0}}},
     "ranking_options.hybrid_search"),
    ({"query": "x", "ranking_options": {"hybrid_search": {"embedding_weight": -1, "text_weight": 1}}},
     "ranking_options.hybrid_search.embedding_weight"),
    ({"query": "x", "rewrite_query": "maybe"}, "rewrite_query"),
])
def test_bad_search_bodies(client: FlaskClient, store: str, body: dict[str, Any], param: str) -> None:
    refused(client.post(f"/v1/vector_stores/{store}/search", json=body), param=param)


def test_a_ranker_must_be_openais_or_a_rerank_model(client: FlaskClient, store: str) -> None:
    err = refused(search(client, store, ranking_options={"ranker": "no-such-reranker"}),
                  param="ranking_options.ranker")
    assert "no-such-reranker" in err["message"]
    err = refused(search(client, store, ranking_options={"ranker": "all-minilm"}), param="ranking_options.ranker")
    assert "not a rerank model" in err["message"]


def test_a_text_only_search_of_an_empty_store_is_an_empty_page(client: FlaskClient, store: str) -> None:
    r = search(client, store, query=["what is panda?", '"AND" OR (x*'], ranking_options={**TEXT_ONLY, "ranker": "none"},
               rewrite_query=True, filters={"type": "or", "filters": [{"key": "lang", "value": "en"},
                                                                     {"key": "year", "type": "gte", "value": 2020}]})
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json() == {"object": "vector_store.search_results.page", "search_query": ["what is panda?",
                            '"AND" OR (x*'], "data": [], "has_more": False, "next_page": None}


@pytest.mark.parametrize(("strategy", "param"), [
    (static(99, 0), "chunking_strategy.static.max_chunk_size_tokens"),
    (static(4097, 0), "chunking_strategy.static.max_chunk_size_tokens"),
    (static(200, 101), "chunking_strategy.static"),
    (static(200, -1), "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static"}, "chunking_strategy"),
    ({"type": "static", "max_chunk_size_tokens": 200, "chunk_overlap_tokens": 0}, "chunking_strategy.max_chunk_size_tokens"),
    ({"type": "auto", "static": STATIC["static"]}, "chunking_strategy"),
    ({"type": "other"}, "chunking_strategy.type"),
])
def test_chunking_out_of_bounds(client: FlaskClient, store: str, strategy: dict[str, Any], param: str) -> None:
    refused(client.post("/v1/vector_stores", json={"chunking_strategy": strategy}), param=param)
    refused(client.post(f"/v1/vector_stores/{store}/files", json={"file_id": "file-x", "chunking_strategy": strategy}),
            param=param)
    refused(client.post(f"/v1/vector_stores/{store}/file_batches",
                        json={"file_ids": ["file-x"], "chunking_strategy": strategy}), param=param)
    refused(client.post(f"/v1/vector_stores/{store}/file_batches",
                        json={"files": [{"file_id": "file-x", "chunking_strategy": strategy}]}),
            param=f"files.0.{param}")


def test_chunking_at_its_bounds_is_accepted(client: FlaskClient) -> None:
    for strategy in (static(100, 50), static(4096, 0), {"type": "auto"}):
        r = client.post("/v1/vector_stores", json={"chunking_strategy": strategy, "model": "smollm2"})
        # the chunk must fit what the model embeds at once: smollm2 embeds 8k tokens, so all three are taken
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_json()["chunking_strategy"]["type"] == "static"
        client.delete(f"/v1/vector_stores/{r.get_json()['id']}")


BAD_PAIRS = [
    ({f"k{i}": "v" for i in range(17)}, "at most 16"),
    ({"k" * 65: "v"}, "64 characters"),
    ({"k": "v" * 513}, "512 characters"),
]


@pytest.mark.parametrize(("metadata", "words"), [*BAD_PAIRS, ({"k": 1}, "string")])
def test_metadata_limits(client: FlaskClient, store: str, metadata: dict[str, Any], words: str) -> None:
    for reply in (client.post("/v1/vector_stores", json={"metadata": metadata}),
                  client.post(f"/v1/vector_stores/{store}", json={"metadata": metadata})):
        err = refused(reply)
        assert err["param"].startswith("metadata") and words in err["message"], err
    assert client.get(f"/v1/vector_stores/{store}").get_json()["metadata"] == {"team": "docs"}  # nothing changed


@pytest.mark.parametrize(("attributes", "words"), [*BAD_PAIRS, ({"k": {"nested": 1}}, "")])
def test_attribute_limits(client: FlaskClient, store: str, attributes: dict[str, Any], words: str) -> None:
    for path, body in ((f"/v1/vector_stores/{store}/files", {"file_id": "file-x", "attributes": attributes}),
                       (f"/v1/vector_stores/{store}/files/file-x", {"attributes": attributes}),
                       (f"/v1/vector_stores/{store}/file_batches", {"file_ids": ["file-x"], "attributes": attributes})):
        err = refused(client.post(path, json=body))
        assert err["param"].startswith("attributes") and words in err["message"], err


def test_attribute_values_may_be_strings_numbers_and_booleans(client: FlaskClient, store: str) -> None:
    ok = {f"k{i}": v for i, v in enumerate(["x" * 512, 3, 2.5, True, False, "", -1])}
    # the body is valid: the 404 is for the File, which does not exist
    err = refused(client.post(f"/v1/vector_stores/{store}/files", json={"file_id": "file-none", "attributes": ok}), 404)
    assert "file-none" in err["message"]


def test_an_update_of_file_attributes_needs_them(client: FlaskClient, store: str) -> None:
    refused(client.post(f"/v1/vector_stores/{store}/files/file-x", json={}), param="attributes")
    refused(client.post(f"/v1/vector_stores/{store}/files/file-x", json={"attributes": None}), 404)


@pytest.mark.parametrize(("body", "param"), [
    ({"file_ids": ["file-a"], "files": [{"file_id": "file-a"}]}, "file_ids"),
    ({}, "file_ids"),
    ({"file_ids": []}, "file_ids"),
    ({"files": []}, "files"),
    ({"file_ids": [f"file-{i}" for i in range(2001)]}, "file_ids"),
    ({"files": [{"id": "file-a"}]}, "files.0.file_id"),
])
def test_file_batches_take_file_ids_or_files(client: FlaskClient, store: str, body: dict[str, Any], param: str) -> None:
    refused(client.post(f"/v1/vector_stores/{store}/file_batches", json=body), param=param)


@pytest.mark.parametrize(("body", "param"), [
    ({"file_ids": [f"file-{i}" for i in range(501)]}, "file_ids"),
    ({"expires_after": {"anchor": "last_active_at", "days": 0}}, "expires_after.days"),
    ({"expires_after": {"anchor": "last_active_at", "days": 366}}, "expires_after.days"),
    ({"expires_after": {"anchor": "created_at", "days": 7}}, "expires_after.anchor"),
    ({"name": 5}, "name"),
    ({"nmae": "typo"}, "nmae"),
    ({"model": ""}, "model"),
])
def test_bad_store_bodies(client: FlaskClient, body: dict[str, Any], param: str) -> None:
    refused(client.post("/v1/vector_stores", json=body), param=param)


def test_a_store_needs_an_embedding_model_that_exists(client: FlaskClient) -> None:
    refused(client.post("/v1/vector_stores", json={"model": "no-such-embedder"}), 404)


def test_an_update_changes_only_what_it_names(client: FlaskClient) -> None:
    store = client.post("/v1/vector_stores", json={"name": "errors", "metadata": {"team": "docs"}}).get_json()["id"]
    r = client.post(f"/v1/vector_stores/{store}", json={"expires_after": {"anchor": "last_active_at", "days": 7}})
    assert r.status_code == 200 and r.get_json()["name"] == "errors" and r.get_json()["metadata"] == {"team": "docs"}
    assert r.get_json()["expires_after"] == {"anchor": "last_active_at", "days": 7} and r.get_json()["expires_at"]
    r = client.post(f"/v1/vector_stores/{store}", json={"name": None, "metadata": None, "expires_after": None})
    got = r.get_json()
    assert (got["name"], got["metadata"], got["expires_after"], got["expires_at"]) == ("", None, None, None)
    client.delete(f"/v1/vector_stores/{store}")


@pytest.mark.parametrize(("query", "param"), [
    ("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("order=up", "order"),
])
def test_list_parameters(client: FlaskClient, store: str, query: str, param: str) -> None:
    refused(client.get(f"/v1/vector_stores?{query}"), param=param)
    refused(client.get(f"/v1/vector_stores/{store}/files?{query}"), param=param)
    refused(client.get(f"/v1/vector_stores/{store}/files?filter=done"), param="filter")


def test_list_pages_strictly_after_the_cursor(client: FlaskClient) -> None:
    made = [client.post("/v1/vector_stores", json={"name": f"page-{i}"}).get_json()["id"] for i in range(3)]
    try:
        seen, after = [], None
        while True:
            page = client.get("/v1/vector_stores?limit=1&order=asc" + (f"&after={after}" if after else "")).get_json()
            seen += [s["id"] for s in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert [s for s in seen if s in made] == made and len(seen) == len(set(seen))
    finally:
        for store_id in made:
            client.delete(f"/v1/vector_stores/{store_id}")


UNKNOWN = "vs_nosuchstore"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "", None), ("post", "", {"name": "x"}), ("delete", "", None),
    ("post", "/search", {"query": "x", "ranking_options": TEXT_ONLY}),
    ("get", "/files", None), ("post", "/files", {"file_id": "file-x"}), ("get", "/files/file-x", None),
    ("post", "/files/file-x", {"attributes": {"a": 1}}), ("delete", "/files/file-x", None),
    ("get", "/files/file-x/content", None),
    ("post", "/file_batches", {"file_ids": ["file-x"]}), ("get", "/file_batches/vsfb_x", None),
    ("post", "/file_batches/vsfb_x/cancel", None), ("get", "/file_batches/vsfb_x/files", None),
    ("post", "/sync", {"documents": []}),
])
def test_an_unknown_store_is_a_404_in_openais_shape(client: FlaskClient, method: str, path: str,
                                                    body: dict[str, Any] | None) -> None:
    err = refused(getattr(client, method)(f"/v1/vector_stores/{UNKNOWN}{path}", json=body), 404)
    assert UNKNOWN in err["message"]


def test_unknown_files_and_batches_of_a_store_are_404s(client: FlaskClient, store: str) -> None:
    for method, path in (("get", "/files/file-nope"), ("delete", "/files/file-nope"),
                         ("get", "/files/file-nope/content"), ("get", "/file_batches/vsfb_nope"),
                         ("post", "/file_batches/vsfb_nope/cancel"), ("get", "/file_batches/vsfb_nope/files")):
        refused(getattr(client, method)(f"/v1/vector_stores/{store}{path}"), 404)


@pytest.mark.parametrize(("body", "param"), [
    ({"documents": [{"source_id": "a.md", "sha256": "xyz"}]}, "documents.0.sha256"),
    ({"documents": [{"source_id": "", "sha256": "0" * 64}]}, "documents.0.source_id"),
    ({"mode": "scoped_full", "documents": []}, "mode"),
    ({"mode": "full"}, "documents"),
])
def test_bad_sync_bodies(client: FlaskClient, store: str, body: dict[str, Any], param: str) -> None:
    refused(client.post(f"/v1/vector_stores/{store}/sync", json=body), param=param)


def test_a_reembed_names_its_model(client: FlaskClient, store: str) -> None:
    refused(client.post(f"/v1/vector_stores/{store}/reembed", json={}), param="model")


def test_a_store_whose_model_was_deleted_or_changed_refuses_searches(client: FlaskClient, settings: Settings) -> None:
    models = ModelStore(settings.models_path)
    models.copy("all-minilm", "vs-doomed")
    models.copy("all-minilm", "vs-swapped")
    try:
        doomed = client.post("/v1/vector_stores", json={"model": "vs-doomed"}).get_json()["id"]
        swapped = client.post("/v1/vector_stores", json={"model": "vs-swapped"}).get_json()["id"]
        models.delete("vs-doomed")
        models.copy("smollm2", "vs-swapped")  # the name now points at other weights
        for store_id, words in ((doomed, "deleted"), (swapped, "changed")):
            err = refused(search(client, store_id, ranking_options=TEXT_ONLY), 409)
            assert words in err["message"] and "reembed" in err["message"]
            assert client.get(f"/v1/vector_stores/{store_id}").status_code == 200  # the store itself is kept
            client.delete(f"/v1/vector_stores/{store_id}")
    finally:
        for name in ("vs-doomed", "vs-swapped"):
            with contextlib.suppress(ModelNotFound):  # deleted above already
                models.delete(name)


def _document(session: Any, store_id: str, digest: str, text: str) -> None:
    """A completed document of one chunk under ``digest``, indexed for the text leg as the worker's apply does."""
    doc = CollectionDocument(collection_id=store_id, source_id=f"src-{digest[:8]}", file_id=f"file-{digest[:8]}",
                             filename="pandas.md", usage_bytes=0, status="completed", chunk_tokens=800,
                             chunk_overlap=400, chunk_count=1)
    session.add(doc)
    session.flush()
    session.execute(insert(CollectionChunk), [{"collection_id": store_id, "document_id": doc.id, "model_digest": digest,
                                               "seq": 0, "text": text, "start": 0, "end": len(text), "tokens": 5,
                                               "embedding": bytes(4 * 384)}])
    collection_search.index_document(session, doc.id)


def test_a_reembed_switch_while_a_search_embeds_is_searched_with_the_new_model(
        client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-embed's switch (new model and digest, the old chunks deleted, one commit) lands after the search read
    its store's model and before its snapshot, as it can while a worker embeds the queries: the search answers
    from the new model's chunks, not with an empty page."""
    store_id = client.post("/v1/vector_stores", json={"name": "switching"}).get_json()["id"]
    make = sessions(settings)
    new = ModelStore(settings.models_path).get("smollm2").model_digest
    with make.begin() as session:
        old = session.scalar(select(Collection.model_digest).where(Collection.id == store_id))
        assert old is not None
        _document(session, store_id, old, "Giant pandas, under the first model.")
    collections = services(client.application).collections
    read_target = collections.search_target
    switches: list[str] = []

    def switched_after(store: str, who: str | None) -> Any:
        target = read_target(store, who)
        if not switches:  # the re-embed job's last item ends now: its switch commits
            with make.begin() as session:
                _document(session, store_id, new, "Giant pandas, under the next model.")
                row = session.get(Collection, store_id)
                assert row is not None
                row.next_model, row.next_digest, row.reembed_job = "smollm2", new, "job_reembedding"
                assert finish_reembed(session, store_id)
            switches.append(target.model_digest)
        return target

    monkeypatch.setattr(collections, "search_target", switched_after)
    try:
        r = search(client, store_id, query="giant pandas", ranking_options=TEXT_ONLY)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert switches == [old]
        assert [hit["content"][0]["text"] for hit in r.get_json()["data"]] == ["Giant pandas, under the next model."]
    finally:
        client.delete(f"/v1/vector_stores/{store_id}")


def test_another_keys_store_is_a_404(settings: Settings) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    client = create_app(keyed).test_client()
    keys = KeyStore(keyed)
    mine = {"Authorization": f"Bearer {keys.create('vs-owner')[0]}"}
    theirs = {"Authorization": f"Bearer {keys.create('vs-other')[0]}"}
    store_id = client.post("/v1/vector_stores", json={"name": "private"}, headers=mine).get_json()["id"]
    try:
        for method, path, body in (("get", "", None), ("post", "", {"name": "stolen"}), ("delete", "", None),
                                   ("post", "/search", {"query": "x", "ranking_options": TEXT_ONLY}),
                                   ("get", "/files", None), ("post", "/sync", {"documents": []})):
            refused(getattr(client, method)(f"/v1/vector_stores/{store_id}{path}", json=body, headers=theirs), 404)
        assert store_id not in [s["id"] for s in client.get("/v1/vector_stores", headers=theirs).get_json()["data"]]
        assert client.get(f"/v1/vector_stores/{store_id}", headers=mine).get_json()["name"] == "private"
        assert store_id in [s["id"] for s in client.get("/v1/vector_stores", headers=mine).get_json()["data"]]
    finally:
        client.delete(f"/v1/vector_stores/{store_id}", headers=mine)


def test_a_create_naming_an_unknown_file_stores_nothing(client: FlaskClient) -> None:
    r = client.post("/v1/vector_stores", json={"name": "orphan-check", "file_ids": ["file-nope"]})
    assert r.status_code == 404 and "file-nope" in r.get_json()["error"]["message"]
    names = [s["name"] for s in client.get("/v1/vector_stores", query_string={"limit": 100}).get_json()["data"]]
    assert "orphan-check" not in names


def test_a_sync_never_reads_a_path_it_is_given(client: FlaskClient, store: str) -> None:
    """The server reads no client's path: a sync names documents by source id and hash, and only Files carry bytes."""
    body = {"mode": "incremental", "documents": [{"source_id": "/etc/passwd", "sha256": "0" * 64}]}
    plan = client.post(f"/v1/vector_stores/{store}/sync", json=body).get_json()
    assert plan["needed"] == ["/etc/passwd"] and plan["job_id"] is None  # asked for an upload, read nothing
    body["documents"][0]["file_id"] = "file-not-uploaded"
    refused(client.post(f"/v1/vector_stores/{store}/sync", json=body), status=404, param="file_id")
