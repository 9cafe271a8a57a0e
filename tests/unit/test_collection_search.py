"""Hybrid search over a collection's chunks (jobs/collection_search.py): OpenAI's filters, the keyword leg, the
vector leg over ``collection_vectors`` and their weighted RRF, on a schema built by the real migrations.

Each search test runs on SQLite (FTS5, packed vector blocks), on PostgreSQL when ``TEST_DATABASE_URL`` is set
(full text, blocks: that server has no pgvector; in a schema of its own, dropped after), and on a private
PostgreSQL with pgvector from ``pgserver`` (HNSW), so the three give the same answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from corral.settings import Settings
from harness.stack import drop_everything
from jobs import collection_search as cs
from jobs import collection_vectors as cv
from jobs.db import engine_for, upgrade
from jobs.models import Collection, CollectionChunk, CollectionDocument
from tests.helpers import HAVE_PGSERVER

POSTGRES_URL = os.environ.get("TEST_DATABASE_URL", "")
DIGEST = "d" * 64
OTHER_DIGEST = "e" * 64
DIMS = 8


# -- filters (no database) ------------------------------------------------------------------------------------

ATTRS = {"lang": "en", "year": 2024, "draft": False, "score": 4.5}


@pytest.mark.parametrize(("flt", "expected"), [
    ({"key": "lang", "type": "eq", "value": "en"}, True),
    ({"key": "lang", "value": "en"}, True),  # eq is the default
    ({"key": "lang", "type": "eq", "value": "fr"}, False),
    ({"key": "lang", "type": "ne", "value": "fr"}, True),
    ({"key": "lang", "type": "ne", "value": "en"}, False),
    ({"key": "year", "type": "gt", "value": 2023}, True),
    ({"key": "year", "type": "gt", "value": 2024}, False),
    ({"key": "year", "type": "gte", "value": 2024}, True),
    ({"key": "year", "type": "lt", "value": 2024}, False),
    ({"key": "year", "type": "lte", "value": 2024.0}, True),
    ({"key": "score", "type": "lt", "value": 5}, True),
    ({"key": "lang", "type": "in", "value": ["fr", "en"]}, True),
    ({"key": "lang", "type": "in", "value": ["fr", "de"]}, False),
    ({"key": "lang", "type": "nin", "value": ["fr", "de"]}, True),
    ({"key": "year", "type": "nin", "value": [2024, 2025]}, False),
    ({"key": "draft", "type": "eq", "value": False}, True),
    ({"key": "draft", "type": "eq", "value": 0}, False),  # a boolean is not a number
    ({"key": "year", "type": "eq", "value": "2024"}, False),  # nor a string a number
    ({"key": "year", "type": "gt", "value": "2000"}, False),  # a type mismatch is no match, never an error
    ({"key": "lang", "type": "gt", "value": 3}, False),
    ({"key": "lang", "type": "gt", "value": "de"}, True),  # strings compare with strings
    # a missing key matches no comparison, ne and nin included
    ({"key": "missing", "type": "eq", "value": "x"}, False),
    ({"key": "missing", "type": "ne", "value": "x"}, False),
    ({"key": "missing", "type": "nin", "value": ["x"]}, False),
    ({"type": "and", "filters": [{"key": "lang", "value": "en"}, {"key": "year", "type": "gte", "value": 2020}]}, True),
    ({"type": "and", "filters": [{"key": "lang", "value": "en"}, {"key": "year", "type": "lt", "value": 2020}]}, False),
    ({"type": "or", "filters": [{"key": "lang", "value": "fr"}, {"key": "year", "type": "lt", "value": 2020}]}, False),
    ({"type": "or", "filters": [
        {"key": "lang", "value": "fr"},
        {"type": "and", "filters": [{"key": "draft", "value": False}, {"key": "score", "type": "gt", "value": 4}]},
    ]}, True),
    (None, True),
])
def test_filters_follow_openai_semantics(flt: dict[str, Any] | None, expected: bool) -> None:
    assert cs.matches(flt, ATTRS) is expected


def test_a_document_without_attributes_matches_only_no_filter() -> None:
    assert cs.matches(None, None)
    assert not cs.matches({"key": "lang", "type": "ne", "value": "en"}, None)
    assert not cs.matches({"key": "lang", "value": "en"}, {"lang": None})


@pytest.mark.parametrize("query", ["what is panda?", '"unbalanced', "AND OR NOT", "NEAR(a b)", "x*", "a:b", "(x", "-y"])
def test_fts_terms_are_quoted(query: str) -> None:
    match = cs.fts_terms(query)
    assert match is not None and all(part.startswith('"') and part.endswith('"') for part in match.split(" OR "))
    assert cs.fts_terms("?! ...") is None


# -- a migrated database ----------------------------------------------------------------------------------------


def _params() -> list[Any]:
    return [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.skipif(
            not POSTGRES_URL.startswith("postgresql"), reason="TEST_DATABASE_URL is not PostgreSQL")),
        pytest.param("pgvector", marks=pytest.mark.skipif(not HAVE_PGSERVER, reason="pgserver is not installed")),
    ]


@pytest.fixture(scope="module", params=_params())
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database migrated once per backend for the module (the migrations take seconds each time)."""
    backend = request.param
    schema = None
    home = tmp_path_factory.mktemp("search")
    if backend == "sqlite":
        url = f"sqlite:///{home / 'search.db'}"
    elif backend == "pgvector":
        url = request.getfixturevalue("pgvector_url")
        drop_everything(engine_for(url))  # the private server's own database: start from nothing
    else:  # a schema of our own, so the shared test database is left alone
        schema = f"collection_search_{os.getpid()}"
        admin = create_engine(POSTGRES_URL)
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = f"{POSTGRES_URL}{'&' if '?' in POSTGRES_URL else '?'}options=-csearch_path%3D{schema}"
    upgrade(Settings(home=home, database_url=url))
    try:
        yield url
    finally:
        engine_for(url).dispose()
        if schema is not None:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()


@pytest.fixture()
def sessions(database: str) -> sessionmaker[Session]:
    """The module's database with no collections in it: each test starts from empty tables."""
    engine = engine_for(database)
    with engine.begin() as conn:
        for table in (cv.VECTOR_TABLE, "collection_chunks", "collection_documents", "collection_batches", "collections"):
            conn.execute(text(f"DELETE FROM {table}"))
    return sessionmaker(engine, expire_on_commit=False)


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIMS, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def axis(i: int, wobble: float = 0.0) -> np.ndarray:
    v = np.zeros(DIMS, dtype=np.float32)
    v[i] = 1.0
    v[(i + 1) % DIMS] = wobble
    return v / np.linalg.norm(v)


def add_collection(session: Session, collection_id: str, digest: str = DIGEST) -> None:
    now = datetime.now(timezone.utc)
    session.add(Collection(id=collection_id, owner=None, name=collection_id, model="all-minilm", model_digest=digest,
                           chunk_tokens=800, chunk_overlap=400, last_active_at=now, created_at=now))
    session.flush()


def add_document(session: Session, collection_id: str, source: str, chunks: list[tuple[str, np.ndarray]],
                 attributes: dict[str, Any] | None = None, digest: str = DIGEST) -> tuple[int, list[int]]:
    """A completed document and its chunks, indexed in the same transaction as the worker's apply does."""
    doc = CollectionDocument(collection_id=collection_id, source_id=source, file_id=f"file-{source}",
                             filename=f"{source}.md", usage_bytes=0, attributes=attributes, status="completed",
                             chunk_tokens=800, chunk_overlap=400, chunk_count=len(chunks))
    session.add(doc)
    session.flush()
    rows = [{"collection_id": collection_id, "document_id": doc.id, "model_digest": digest, "seq": n, "text": body,
             "start": 10 * n, "end": 10 * n + len(body), "tokens": 5, "embedding": vec.astype("<f4").tobytes()}
            for n, (body, vec) in enumerate(chunks)]
    session.execute(insert(CollectionChunk), rows)
    cs.index_document(session, doc.id)
    ids = list(session.scalars(select(CollectionChunk.id).where(CollectionChunk.document_id == doc.id)
                               .order_by(CollectionChunk.seq)))
    return doc.id, ids


def run(sessions: sessionmaker[Session], query: str, vector: np.ndarray | None = None, **kw: Any) -> list[cs.Hit]:
    options: dict[str, Any] = {"collection_id": "vs_a", "model_digest": DIGEST, "filters": None, "k": 10}
    options.update(kw)
    return cs.search(sessions, query_vectors=[] if vector is None else [vector], query_texts=[query], **options)


@pytest.fixture()
def corpus(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Three documents; the chunk that names error E1234 points away from every query vector."""
    with sessions.begin() as session:
        add_collection(session, "vs_a")
        add_collection(session, "vs_b")
        _, (pandas, bamboo) = add_document(session, "vs_a", "animals", [
            ("Giant pandas eat bamboo in the mountains of China.", axis(0)),
            ("Bamboo grows quickly and feeds many animals.", axis(0, 0.4)),
        ], {"lang": "en", "year": 2021})
        _, (error, _) = add_document(session, "vs_a", "errors", [
            ("The loader fails with error E1234 when the file is truncated.", axis(5)),
            ("Retry the upload after checking the network connection.", axis(6)),
        ], {"lang": "en", "year": 2024, "draft": True})
        _, (french,) = add_document(session, "vs_a", "french", [
            ("Le panda mange du bambou.", axis(0, 0.2)),
        ], {"lang": "fr", "year": 2024})
        add_document(session, "vs_b", "other", [("Giant pandas in another store, error E1234.", axis(0))])
        add_document(session, "vs_a", "reembedded", [("Giant pandas, E1234, under the next model.", axis(0))],
                     digest=OTHER_DIGEST)
    return {"pandas": pandas, "bamboo": bamboo, "error": error, "french": french}


def test_the_text_leg_finds_an_exact_term_the_vector_leg_misses(sessions: sessionmaker[Session],
                                                                 corpus: dict[str, int]) -> None:
    near_pandas = axis(0, 0.01)
    vector = run(sessions, "E1234", near_pandas, text_weight=0)
    assert vector[0].chunk_id == corpus["pandas"] and vector[-1].chunk_id != corpus["pandas"]
    assert [h.chunk_id for h in vector].index(corpus["error"]) >= 3  # cosine 0: far from the query
    keyword = run(sessions, "E1234", near_pandas, embedding_weight=0)
    assert [h.chunk_id for h in keyword] == [corpus["error"]]
    assert keyword[0].text_rank == 1 and keyword[0].vector_rank is None and keyword[0].score == pytest.approx(1.0)
    hybrid = run(sessions, "E1234", near_pandas)
    assert {h.chunk_id for h in hybrid[:2]} == {corpus["pandas"], corpus["error"]}


def test_fusion_is_weighted_rrf_normalised_to_one(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    # Vector ranks: pandas 1, french 2, bamboo 3 ...; text ("bamboo grows") ranks bamboo 1, pandas 2.
    hits = run(sessions, "bamboo grows", axis(0, 0.05))
    by_id = {h.chunk_id: h for h in hits}
    best = 1 / 61 + 1 / 61
    pandas, bamboo = by_id[corpus["pandas"]], by_id[corpus["bamboo"]]
    assert (pandas.vector_rank, pandas.text_rank) == (1, 2)
    assert (bamboo.vector_rank, bamboo.text_rank) == (3, 1)
    assert pandas.score == pytest.approx((1 / 61 + 1 / 62) / best)
    assert bamboo.score == pytest.approx((1 / 63 + 1 / 61) / best)
    assert [h.chunk_id for h in hits[:2]] == [corpus["pandas"], corpus["bamboo"]]
    assert all(0 <= h.score <= 1 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # weighting the text leg turns the order around
    weighted = run(sessions, "bamboo grows", axis(0, 0.05), embedding_weight=0.2, text_weight=1.0)
    assert weighted[0].chunk_id == corpus["bamboo"]


def test_a_weight_of_zero_turns_a_leg_off(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    vector_only = run(sessions, "bamboo", axis(0), text_weight=0)
    assert vector_only and all(h.text_rank is None for h in vector_only)
    assert vector_only[0].score == pytest.approx(1.0, abs=1e-5)  # the cosine, not RRF
    assert all(h.score >= 0 for h in vector_only)  # clipped at 0
    text_only = run(sessions, "bamboo", None, embedding_weight=0)
    assert {h.chunk_id for h in text_only} == {corpus["pandas"], corpus["bamboo"]}
    assert all(h.vector_rank is None for h in text_only)
    assert run(sessions, "bamboo", axis(0), embedding_weight=0, text_weight=0) == []


@pytest.mark.parametrize("query", ["what is panda?", '"unbalanced quote', "AND OR NOT", "NEAR(pandas bamboo)",
                                   "bamboo*", "col:umn", "(pandas", "-bamboo", "'; DROP TABLE x; --", ""])
def test_fts_syntax_in_a_query_is_text(sessions: sessionmaker[Session], corpus: dict[str, int], query: str) -> None:
    hits = run(sessions, query, None, embedding_weight=0)
    if query == "what is panda?":
        assert corpus["french"] in {h.chunk_id for h in hits}  # "panda" as a word
    if query == "":
        assert hits == []


@pytest.mark.parametrize("database", [p for p in _params() if p != "sqlite"], indirect=True)  # PostgreSQL's leg
def test_postgres_ranks_its_best_evidence_when_matches_pass_the_cap(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's keyword leg weights each term by its rarity (a chunk holding three of the query's words
    outranks one repeating a single word, which ts_rank_cd put first), and above TEXT_CANDIDATES matching chunks
    it ranks those holding every term, a rare term or two terms, leaving out chunks that hold one common term
    only (it would read every one of them from the heap)."""
    with sessions.begin() as session:
        add_collection(session, "vs_a")
        # single-term matches, each term six times, first in the table
        _, singles = add_document(session, "vs_a", "singles", [(f"{w} " * 6 + f"filler {i}.", axis(1))
                                                               for i, w in enumerate(["lantern", "harbor", "meadow"] * 3)])
        _, (pair, every, code) = add_document(session, "vs_a", "best", [
            ("A lantern by the harbor.", axis(2)), ("The lantern lit the harbor meadow.", axis(3)),
            ("The loader stopped with E1234.", axis(4))])
    with sessions() as session:
        found = cs.text_leg(session, "vs_a", DIGEST, "lantern harbor meadow", None, 50)
        assert len(found) == 11 and found[0][0] == every  # every match; three terms outrank one term six times
        session.execute(text("ANALYZE collection_chunks"))  # now the planner knows lantern, harbor and meadow
        session.commit()
    monkeypatch.setattr(cs, "TEXT_CANDIDATES", 2)
    with sessions() as session:
        capped = cs.text_leg(session, "vs_a", DIGEST, "lantern harbor meadow", None, 2)
        assert [chunk for chunk, _, _ in capped] == [every, pair]
        two_terms = cs.text_leg(session, "vs_a", DIGEST, "lantern harbor", None, 2)
        assert {chunk for chunk, _, _ in two_terms} == {every, pair}
        rare = cs.text_leg(session, "vs_a", DIGEST, "lantern E1234", None, 2)  # the rare term's chunk is last
        assert code in {chunk for chunk, _, _ in rare} and len(rare) == 2


def test_only_the_model_and_the_collection_asked_for(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    hits = run(sessions, "giant pandas E1234", axis(0))
    with sessions() as session:
        rows = cs.hydrate(session, hits)
    assert rows and {r["source_id"] for r in rows} == {"animals", "errors", "french"}
    other = run(sessions, "giant pandas E1234", axis(0), collection_id="vs_b")
    with sessions() as session:
        assert [r["source_id"] for r in cs.hydrate(session, other)] == ["other"]
    reembedded = run(sessions, "giant pandas E1234", axis(0), model_digest=OTHER_DIGEST)
    with sessions() as session:
        assert [r["source_id"] for r in cs.hydrate(session, reembedded)] == ["reembedded"]


def test_filters_limit_both_legs(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    french = run(sessions, "pandas bamboo", axis(0), filters={"key": "lang", "value": "fr"})
    assert [h.chunk_id for h in french] == [corpus["french"]]
    recent = run(sessions, "E1234 pandas", axis(0), filters={
        "type": "and", "filters": [{"key": "year", "type": "gte", "value": 2024},
                                   {"key": "lang", "type": "ne", "value": "en"}]})
    assert [h.chunk_id for h in recent] == [corpus["french"]]
    # "french" has no "draft": a missing key never matches, not even ne
    assert run(sessions, "E1234 pandas", axis(0), filters={"key": "draft", "type": "ne", "value": True}) == []
    assert run(sessions, "pandas", axis(0), filters={"key": "nothing", "value": 1}) == []
    assert run(sessions, "pandas", axis(0), filters={"key": "year", "type": "gt", "value": "2000"}) == []


def test_hydrate_gives_the_chunk_and_its_document(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    hits = run(sessions, "E1234", axis(5), k=1)
    with sessions() as session:
        (row,) = cs.hydrate(session, hits)
    assert row["chunk_id"] == corpus["error"] and row["text"].startswith("The loader fails")
    assert (row["file_id"], row["source_id"], row["filename"]) == ("file-errors", "errors", "errors.md")
    assert row["attributes"] == {"lang": "en", "year": 2024, "draft": True}
    assert (row["seq"], row["start"], row["end"]) == (0, 0, len(row["text"]))
    assert 0 < row["score"] <= 1


def test_replaced_chunks_never_come_back(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    """A re-synced document's chunks are deleted and new ones inserted (on SQLite, possibly with the same ids):
    the index gives the new vectors, and blocks left half dead are rewritten."""
    with sessions.begin() as session:
        doc_id = session.scalar(select(CollectionDocument.id).where(CollectionDocument.source_id == "french"))
        session.execute(text("DELETE FROM collection_chunks WHERE document_id = :d"), {"d": doc_id})
        rows = [{"collection_id": "vs_a", "document_id": doc_id, "model_digest": DIGEST, "seq": 0,
                 "text": "Le panda dort.", "start": 0, "end": 14, "tokens": 4, "embedding": axis(3).tobytes()}]
        session.execute(insert(CollectionChunk), rows)
        cs.index_document(session, doc_id)
    top = run(sessions, "", axis(3), text_weight=0, k=1)
    with sessions() as session:
        (row,) = cs.hydrate(session, top)
    assert row["text"] == "Le panda dort." and top[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(h.chunk_id != corpus["french"] or h.vector_score != pytest.approx(float(axis(0, 0.2) @ axis(3)))
               for h in run(sessions, "", axis(0), text_weight=0))

    with sessions.begin() as session:  # most of the collection goes: its blocks are compacted on the next index
        session.execute(text("DELETE FROM collection_documents WHERE source_id IN ('animals', 'errors')"))
        add_document(session, "vs_a", "late", [("A late addition about otters.", axis(7))])
    hits = run(sessions, "otters pandas", axis(7))
    with sessions() as session:
        assert {r["source_id"] for r in cs.hydrate(session, hits)} == {"late", "french"}
        if cv._layout(session) == "blocks":
            live = session.scalar(text("SELECT count(*) FROM collection_chunks WHERE collection_id = 'vs_a' "
                                       "AND model_digest = :m"), {"m": DIGEST})
            held = session.scalar(text(f"SELECT sum(n) FROM {cs.VECTOR_TABLE} WHERE collection_id = 'vs_a' "
                                       "AND model_digest = :m"), {"m": DIGEST})
            assert held == live == 2


def test_several_queries_fuse_one_leg_each(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    hits = cs.search(sessions, collection_id="vs_a", model_digest=DIGEST, query_vectors=[axis(0), axis(5)],
                     query_texts=["bamboo", "E1234"], filters=None, k=10)
    first_two = {h.chunk_id for h in hits[:2]}
    assert first_two == {corpus["pandas"], corpus["error"]} or corpus["error"] in first_two
    assert all(0 <= h.score <= 1 for h in hits)


def test_deleting_a_collection_drops_its_vectors(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    with sessions.begin() as session:
        session.execute(text("DELETE FROM collections WHERE id = 'vs_b'"))
    with sessions() as session:
        left = session.scalar(text(f"SELECT count(*) FROM {cs.VECTOR_TABLE} WHERE collection_id = 'vs_b'"))
    assert left == 0


def test_index_document_can_keep_to_one_model(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    """A re-embed's apply indexes the next model's chunks only, not the current model's again."""
    with sessions.begin() as session:
        doc_id = session.scalar(select(CollectionDocument.id).where(CollectionDocument.source_id == "reembedded"))
        assert doc_id is not None
        assert cs.index_document(session, doc_id, DIGEST) == 0
        assert cs.index_document(session, doc_id, OTHER_DIGEST) == 1  # again: its earlier entry is replaced
    hits = run(sessions, "", axis(0), text_weight=0, model_digest=OTHER_DIGEST)
    assert len(hits) == 1 and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_sign_bits_pack_one_bit_a_dimension_in_whole_words() -> None:
    codes = cv.sign_bits(np.array([[0.5, -1.0, 0.0, 2.0, 0.1, -0.1, 0.3, 0.0]], dtype=np.float32))
    assert codes.dtype == np.dtype("<u8") and codes.shape == (1, 1)
    assert codes.view(np.uint8)[0, 0] == 0b10011010  # set where positive (zero is not), first dimension first
    assert cv.sign_bits(np.ones((3, 100), np.float32)).shape == (3, 2)  # 100 bits fill two words


def _block_backends() -> list[Any]:
    """The backends whose vector index is sign-bit blocks: all but pgvector's (HNSW)."""
    return [p for p in _params() if (p.values[0] if hasattr(p, "values") else p) != "pgvector"]


@pytest.mark.parametrize("database", _block_backends(), indirect=True)
def test_the_sign_bit_leg_rescores_its_candidates_to_the_exact_top_k(sessions: sessionmaker[Session]) -> None:
    """By Hamming distance to the query's signs ``near`` comes first, ``nearer`` second, ``nearest`` third, and by
    cosine the other way round: rescoring three candidates gives the exact top two; two candidates cannot."""
    near, nearer, nearest = unit(0.9, -0.1, -0.1), unit(0.95, 0.1, -0.05), unit(0.99, 0.05, 0.05)
    with sessions.begin() as session:
        add_collection(session, "vs_a")
        far = [(f"far {i}", unit(-1.0, *np.random.default_rng(i).uniform(-1, 1, DIMS - 1))) for i in range(40)]
        _, ids = add_document(session, "vs_a", "signs", [("near", near), ("nearer", nearer), ("nearest", nearest), *far])
        assert cv._layout(session) == "blocks"
    q = unit(1.0)
    exact = cv.chunks_legs(sessions, "vs_a", DIGEST, [q], None, 2)[0]
    assert [c for c, _, _ in exact] == [ids[2], ids[1]]
    (leg,) = cv.blocks_legs(sessions, "vs_a", DIGEST, [q], None, 2, rescore=3)
    assert [c for c, _, _ in leg] == [ids[2], ids[1]]
    assert [s for _, _, s in leg] == pytest.approx([s for _, _, s in exact])  # each chunk's own cosine
    (short,) = cv.blocks_legs(sessions, "vs_a", DIGEST, [q], None, 2, rescore=2)
    assert [c for c, _, _ in short] == [ids[1], ids[0]]
    # the default rescores max(RESCORE * n, RESCORE_MIN) candidates: the whole of this collection
    hits = run(sessions, "", q, text_weight=0, k=2)
    assert [h.chunk_id for h in hits] == [ids[2], ids[1]]


def test_forget_drops_a_models_index_entries(sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    def held(collection_id: str, digest: str) -> int:
        with sessions() as session:
            return int(session.scalar(text(f"SELECT count(*) FROM {cv.VECTOR_TABLE} WHERE collection_id = :c "
                                           "AND model_digest = :m"), {"c": collection_id, "m": digest}) or 0)

    def hnsw(collection_id: str, digest: str) -> bool:
        with sessions() as session:
            return session.scalar(text(f"SELECT to_regclass('{cv._hnsw_name(collection_id, digest)}') IS NOT NULL")) is True

    with sessions() as session:
        pgvector = cv._layout(session) == "pgvector"
    assert held("vs_a", OTHER_DIGEST) >= 1 and held("vs_a", DIGEST) >= 1
    assert not pgvector or hnsw("vs_a", OTHER_DIGEST)
    with sessions.begin() as session:  # a re-embed's switch: the old model's chunks go, then its index
        session.execute(text("DELETE FROM collection_chunks WHERE model_digest = :m"), {"m": OTHER_DIGEST})
        cs.forget(session, "vs_a", OTHER_DIGEST)
    assert held("vs_a", OTHER_DIGEST) == 0 and held("vs_a", DIGEST) >= 1
    assert not pgvector or (not hnsw("vs_a", OTHER_DIGEST) and hnsw("vs_a", DIGEST))
    with sessions.begin() as session:  # a deleted collection: every model's
        cs.forget(session, "vs_a", None)
    assert held("vs_a", DIGEST) == 0 and held("vs_b", DIGEST) == 1
    assert not pgvector or (not hnsw("vs_a", DIGEST) and hnsw("vs_b", DIGEST))
    assert run(sessions, "", axis(0), text_weight=0, collection_id="vs_b")


def test_an_upgrade_rebuilds_blocks_of_the_earlier_int8_code(sessions: sessionmaker[Session],
                                                             corpus: dict[str, int]) -> None:
    """A database indexed before the sign bits has blocks with a ``vectors`` column: until ``corral db upgrade``
    its searches scan the chunks, and the upgrade rebuilds the table from them."""
    engine = sessions.kw["bind"]
    blob = "BYTEA" if engine.dialect.name == "postgresql" else "BLOB"
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {cv.VECTOR_TABLE}"))
        conn.execute(text(f"CREATE TABLE {cv.VECTOR_TABLE} (id INTEGER PRIMARY KEY, collection_id VARCHAR(40), "
                          f"model_digest VARCHAR(64), dims INTEGER, n INTEGER, min_chunk BIGINT, max_chunk BIGINT, "
                          f"chunk_ids {blob}, document_ids {blob}, vectors {blob})"))
    with sessions() as session:
        assert cv._layout(session) == "old"
    assert run(sessions, "", axis(0), text_weight=0)[0].chunk_id == corpus["pandas"]  # the exact scan meanwhile
    with engine.begin() as conn:
        layout = cv.ensure_collection_index(conn)
    with sessions() as session:
        assert cv._layout(session) == layout
        if layout == "blocks":
            assert session.scalar(text(f"SELECT sum(n) FROM {cv.VECTOR_TABLE} WHERE collection_id = 'vs_a'")) == 6
    hits = run(sessions, "", axis(0), text_weight=0)
    assert hits[0].chunk_id == corpus["pandas"] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_a_search_snapshot_keeps_chunks_a_reindex_replaces_meanwhile(
        sessions: sessionmaker[Session], corpus: dict[str, int]) -> None:
    """A document re-indexed between a search's legs and its hydrate (its chunks deleted and inserted anew, as
    apply_document does) is still answered from the snapshot the legs read, not dropped."""
    with cs.snapshot(sessions) as reads:
        hits = run(reads, "giant pandas", axis(0))  # type: ignore[arg-type]
        assert corpus["pandas"] in {h.chunk_id for h in hits}
        with sessions.begin() as writer:  # another process re-indexes the document and commits
            doc_id = writer.scalar(select(CollectionDocument.id).where(CollectionDocument.source_id == "animals"))
            writer.execute(text("DELETE FROM collection_chunks WHERE document_id = :d"), {"d": doc_id})
            writer.execute(insert(CollectionChunk), [{
                "collection_id": "vs_a", "document_id": doc_id, "model_digest": DIGEST, "seq": 0,
                "text": "Giant pandas, re-indexed.", "start": 0, "end": 25, "tokens": 4,
                "embedding": axis(0).astype("<f4").tobytes()}])
            cs.index_document(writer, doc_id)
        with reads() as session:
            rows = cs.hydrate(session, hits)
    assert [r["chunk_id"] for r in rows] == [h.chunk_id for h in hits]  # none dropped
    assert "Giant pandas eat bamboo in the mountains of China." in {r["text"] for r in rows}
    with sessions() as session:  # outside the snapshot, the old chunk is gone
        assert not cs.hydrate(session, [h for h in hits if h.chunk_id == corpus["pandas"]])
