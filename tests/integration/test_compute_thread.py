"""A worker's llama.cpp compute always runs on one thread, whoever asks for it (workers/compute.py).

With libgomp, every extra thread that ever decoded leaves an OpenMP team behind, and past one thread per
CPU libgomp stops spinning at barriers: on 2 cores the same batched decode ran at half speed.  What the
worker must guarantee is that Celery task threads (embeddings) and decode-loop threads (chat) never call
``llama_decode`` themselves.  The models are the real defaults, loaded in this process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from corral.modelstore.store import ModelStore
from workers import compute
from workers.engine import LoadedModel, LoadSpec

pytestmark = pytest.mark.slow


@pytest.fixture()
def decode_threads(spy_llama_decode: Callable[[Callable[[Any], None]], None]) -> list[int]:
    """Record the thread of every real ``llama_decode`` call (the call itself still runs)."""
    seen: list[int] = []
    spy_llama_decode(lambda batch: seen.append(threading.get_ident()))
    return seen


def load(models_dir: Path, name: str, *, embedding: bool) -> LoadedModel:
    store = ModelStore(models_dir)
    path = store.blob_path(store.get(name).model_digest)
    return LoadedModel(LoadSpec(path=path, embedding=embedding, n_ctx=512, n_gpu_layers=0, n_threads=1, parallel=4))


@pytest.fixture(scope="module")
def models(models_dir: Path) -> Iterator[tuple[LoadedModel, LoadedModel]]:
    chat, embed = load(models_dir, "smollm2", embedding=False), load(models_dir, "all-minilm", embedding=True)
    yield chat, embed
    chat.close()
    embed.close()


def test_chat_and_embeddings_from_many_threads_decode_on_one(
    models: tuple[LoadedModel, LoadedModel], decode_threads: list[int]
) -> None:
    chat, embed = models
    texts = [f"document {i}: the river runs to the sea past {i} mills" for i in range(6)]
    alone = [embed.embed_array(embed.embed_tokens([t], truncate=True))[0] for t in texts]

    def embed_one(text: str) -> np.ndarray:
        return embed.embed_array(embed.embed_tokens([text], truncate=True))[0]

    def story(subject: str) -> int:
        result = chat.generate(
            chat.raw_prompt(f"Once upon a time, {subject}"), {"temperature": 0, "num_predict": 8},
            stops=[], fmt=None, on_text=lambda _: False, cancelled=lambda: False,
        )
        return result.eval_count

    decode_threads.clear()
    callers = ThreadPoolExecutor(8)
    try:
        vectors = list(callers.map(embed_one, texts))
        counts = list(callers.map(story, ["a dragon", "a lost cat", "a river", "a clockmaker"]))
        vectors += list(callers.map(embed_one, texts))
    finally:
        callers.shutdown()

    assert counts == [8, 8, 8, 8]
    for got, want in zip(vectors, alone + alone):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert len(decode_threads) >= 12 + 8  # 12 embeddings, at least 8 decode steps of the stories
    assert set(decode_threads) == {compute.compute_thread_ident()}, "llama_decode ran on more than one thread"
