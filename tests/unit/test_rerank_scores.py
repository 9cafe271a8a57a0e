"""A worker's rerank scores (workers/rerank.py) on a cross-encoder GGUF made from seeded weights
(tests/ggufs.py) equal a numpy reference of the same network on the same tokens (tests/rerank_reference.py):
alone, and packed with other pairs of other lengths, many decodes' worth; with llama.cpp's pair layout, the
document's text never a separator, the document cut to fit and never the query.  In process: llama.cpp, no
worker, no Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import BadRequest, ContextLengthExceeded, RequestCanceled
from tests.ggufs import cross_encoder, unknown_architecture
from tests.rerank_reference import ReferenceCrossEncoder
from workers.engine import LoadedModel, LoadSpec
from workers.rerank import CPU_PACK_TOKENS, pairs, require_reranker, rerank, score_pairs

CLS, SEP = 2, 3  # the fixture's [CLS] (BOS) and [SEP] (EOS) ids
N_CTX = 128
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital of France.",
    "The river flows into the sea.",
    "Berlin is the capital of Germany, a big country in the north.",
    "football",
    "The Eiffel tower in Paris was built in the year 1889 and is the most famous tower in the world.",
    "Rome",
]
TOLERANCE = 1e-3
TEMPLATE = "[CLS] question : {query} [SEP] answer : {document} [SEP]"


def load(path: Path) -> LoadedModel:
    return LoadedModel(LoadSpec(path=path, embedding=True, n_ctx=N_CTX, n_gpu_layers=0, n_threads=2,
                                pooling_rank=True))


@pytest.fixture(scope="module")
def fixture_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cross_encoder(tmp_path_factory.mktemp("rerank") / "cross-encoder.gguf")


@pytest.fixture(scope="module")
def model(fixture_path: Path) -> Iterator[LoadedModel]:
    loaded = load(fixture_path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def reference(fixture_path: Path) -> ReferenceCrossEncoder:
    return ReferenceCrossEncoder(fixture_path)


def text(model: LoadedModel, value: str) -> list[int]:
    return list(model.llm.tokenize(value.encode(), add_bos=False, special=False))


def test_a_pair_is_cls_query_sep_document_sep_and_scores_as_the_reference(
    model: LoadedModel, reference: ReferenceCrossEncoder
) -> None:
    query = text(model, QUERY)
    for document in DOCUMENTS:
        built = pairs(model, QUERY, [document], truncate=True)
        assert built == [[CLS, *query, SEP, *text(model, document), SEP]]
        scores, count = rerank(model, QUERY, [document], truncate=True)
        assert count == len(built[0])
        assert scores[0] == pytest.approx(reference.score(built[0]), abs=TOLERANCE)
    scores = [rerank(model, QUERY, [d], truncate=True)[0][0] for d in DOCUMENTS]
    assert max(scores) - min(scores) > 0.5  # the documents are told apart: a ranking means something


def test_packed_pairs_score_as_each_alone(
    model: LoadedModel, reference: ReferenceCrossEncoder, spy_llama_decode: Callable[[Callable[[Any], None]], None]
) -> None:
    """Many pairs of different lengths, more than one decode holds: each its own sequence in shared decodes,
    every score as the reference has it, in the documents' order."""
    documents = [" ".join(DOCUMENTS[: 1 + i % len(DOCUMENTS)])[: 20 + 7 * i] for i in range(60)]
    built = pairs(model, QUERY, documents, truncate=True)
    decodes: list[int] = []
    spy_llama_decode(lambda batch: decodes.append(int(batch.n_tokens)))
    scores = score_pairs(model, built)
    assert sum(len(p) for p in built) > 3 * CPU_PACK_TOKENS and len(decodes) > 3  # packed, over several decodes
    assert max(decodes) <= CPU_PACK_TOKENS and len(decodes) < len(built) / 2  # many pairs share each decode
    expected = reference.scores(built)
    assert max(abs(a - b) for a, b in zip(scores, expected, strict=True)) < TOLERANCE
    # Alone, each pair scores as the reference too.  Not bit for bit as packed: with AVX-512 kernels (zen4) llama.cpp
    # multiplies a one-pair decode and a packed one by different paths, and scores part by up to ~4e-4 (the AVX2
    # build agrees to 1e-5); both are within the reference's tolerance.
    alone = [score_pairs(model, [p])[0] for p in built[:5]]
    assert alone == pytest.approx(expected[:5], abs=TOLERANCE)
    assert alone == pytest.approx(scores[:5], abs=TOLERANCE)


def test_a_literal_separator_in_a_document_stays_text(model: LoadedModel, reference: ReferenceCrossEncoder) -> None:
    spelled = "Paris [SEP] is the capital [CLS]"
    (pair,) = pairs(model, QUERY, [spelled], truncate=True)
    assert pair.count(SEP) == 2 and pair.count(CLS) == 1  # only the markers corral put there
    assert pair == [CLS, *text(model, QUERY), SEP, *text(model, spelled), SEP]
    (score,), _ = rerank(model, QUERY, [spelled], truncate=True)
    assert score == pytest.approx(reference.score(pair), abs=TOLERANCE)


def test_a_long_document_is_cut_and_the_query_kept(model: LoadedModel, reference: ReferenceCrossEncoder) -> None:
    long_document = " ".join(["the tower in paris is famous"] * 40)
    (pair,) = pairs(model, QUERY, [long_document], truncate=True)
    query = text(model, QUERY)
    assert len(pair) == N_CTX
    assert pair[: len(query) + 2] == [CLS, *query, SEP] and pair[-1] == SEP
    assert pair[len(query) + 2 : -1] == text(model, long_document)[: N_CTX - len(query) - 3]
    (score,), count = rerank(model, QUERY, [long_document], truncate=True)
    assert count == N_CTX and score == pytest.approx(reference.score(pair), abs=TOLERANCE)
    with pytest.raises(ContextLengthExceeded, match="truncate is false"):
        pairs(model, QUERY, ["short", long_document], truncate=False)
    with pytest.raises(ContextLengthExceeded, match="leaves no room for a document"):
        pairs(model, long_document, ["short"], truncate=True)  # the query is never cut


def test_a_rerank_template_frames_the_pair(tmp_path: Path) -> None:
    """A GGUF with a ``rerank`` chat template: the pair is the template's text with the query and document in
    it (its own [CLS]/[SEP] as special tokens, no BOS added), scored as the reference scores those tokens; a
    document that spells a special token is still text."""
    path = cross_encoder(tmp_path / "templated.gguf", rerank_template=TEMPLATE)
    model = load(path)
    reference = ReferenceCrossEncoder(path)
    try:
        special = list(model.llm.tokenize(TEMPLATE.format(query=QUERY, document=DOCUMENTS[0]).encode(),
                                          add_bos=False, special=True))
        (pair,) = pairs(model, QUERY, [DOCUMENTS[0]], truncate=True)
        assert pair == special and pair[0] == CLS and pair.count(SEP) == 2
        spelled = "Paris [SEP] is the capital"
        (pair,) = pairs(model, QUERY, [spelled], truncate=True)
        assert pair.count(SEP) == 2 and text(model, spelled) == pair[-1 - len(text(model, spelled)) : -1]
        built = pairs(model, QUERY, DOCUMENTS, truncate=True)
        scores = score_pairs(model, built)
        assert max(abs(a - b) for a, b in zip(scores, reference.scores(built), strict=True)) < TOLERANCE
        (long_pair,) = pairs(model, QUERY, [" ".join(["paris"] * 300)], truncate=True)
        assert len(long_pair) == N_CTX and long_pair[-1] == SEP  # cut inside the template: its tail is kept
    finally:
        model.close()


def test_a_model_without_a_classification_head_is_not_a_reranker(fixture_path: Path, tmp_path: Path) -> None:
    require_reranker(fixture_path, "cross-encoder")
    with pytest.raises(BadRequest, match="model 'plain' is not a reranker"):
        require_reranker(unknown_architecture(tmp_path / "plain.gguf"), "plain")
    embed = LoadSpec(path=fixture_path, embedding=True, n_ctx=N_CTX, n_gpu_layers=0, n_threads=2)
    assert embed != LoadSpec(path=fixture_path, embedding=True, n_ctx=N_CTX, n_gpu_layers=0, n_threads=2,
                             pooling_rank=True)  # never one context for both


def test_a_client_gone_stops_the_scoring_between_decodes(model: LoadedModel) -> None:
    built = pairs(model, QUERY, DOCUMENTS * 20, truncate=True)  # several decodes' worth
    asked: list[bool] = []

    def gone() -> bool:
        asked.append(True)
        return True

    with pytest.raises(RequestCanceled):
        score_pairs(model, built, gone)
    assert len(asked) == 1  # after the first decode, before the second
    assert len(score_pairs(model, built[:2], gone)) == 2  # one decode: nothing to stop
