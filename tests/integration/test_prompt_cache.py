"""A slot keeps its last sequence's KV cells, and a prompt that shares their prefix decodes only the rest.

What a user notices: the next turn of a chat (the whole conversation sent again) starts answering after
decoding only the new messages, and the answer is exactly the one a cold model gives (greedy).  The model is
the real default, loaded in this process with the weights a CPU worker uses; every token llama.cpp decodes is
counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.store import ModelStore
from workers.engine import LoadedModel, LoadSpec

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture()
def decoded_tokens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every real ``llama_decode`` batch (the call itself still runs)."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    sizes: list[int] = []
    real = bindings.llama_decode

    def counting(ctx: Any, batch: Any) -> int:
        sizes.append(int(batch.n_tokens))
        return int(real(ctx, batch))

    monkeypatch.setattr(bindings, "llama_decode", counting)
    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    return sizes


def load(models_dir: Path) -> LoadedModel:
    store = ModelStore(models_dir)
    path = store.blob_path(store.get("smollm2").model_digest)
    return LoadedModel(LoadSpec(path=path, embedding=False, n_ctx=1024, n_gpu_layers=0, n_threads=2, parallel=2,
                                weights="q8_0"))


@pytest.fixture(scope="module")
def warm(models_dir: Path) -> Iterator[LoadedModel]:
    model = load(models_dir)
    yield model
    model.close()


def answer(model: LoadedModel, messages: list[dict[str, str]]) -> tuple[str, Any, int]:
    prompt, stops = model.chat_prompt(messages)
    pieces: list[str] = []
    result = model.generate(prompt, GREEDY, stops=stops, fmt=None, on_text=lambda t: pieces.append(t) and False,
                            cancelled=lambda: False)
    return "".join(pieces), result, len(prompt)


def test_the_next_turn_of_a_chat_decodes_only_the_new_messages(
    warm: LoadedModel, models_dir: Path, decoded_tokens: list[int]
) -> None:
    history = [
        {"role": "system", "content": "You are a careful travel agent. " * 20},
        {"role": "user", "content": "Plan a day in Lisbon for someone who likes old trams and bakeries."},
    ]
    first, _, first_prompt = answer(warm, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And in the evening?"}]

    decoded_tokens.clear()
    second, result, second_prompt = answer(warm, history)
    assert first_prompt > 150 and result.prompt_eval_count == second_prompt
    new_tokens = second_prompt - first_prompt
    # The new messages, the tokens of the first answer the template renders differently, and one token per
    # generated token; not the conversation so far.
    assert sum(decoded_tokens) <= new_tokens + result.eval_count + 8, (sum(decoded_tokens), new_tokens)

    cold = load(models_dir)
    try:
        decoded_tokens.clear()
        cold_second, cold_result, _ = answer(cold, history)
        assert sum(decoded_tokens) >= second_prompt  # a cold model decodes the whole conversation
    finally:
        cold.close()
    assert second == cold_second and result.eval_count == cold_result.eval_count


def test_a_shorter_prompt_sharing_a_cached_prefix_still_gets_its_own_answer(warm: LoadedModel) -> None:
    """A cached slot holding more than the new prompt (its prompt and answer) must not leak that tail."""
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    once, _, _ = answer(warm, messages)
    again, _, _ = answer(warm, messages)  # the whole prompt is cached: its last token is decoded again
    assert once == again and once
