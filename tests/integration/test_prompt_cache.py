"""A slot keeps its last sequence's KV cells, and a prompt that shares their prefix decodes only the rest.

What a user notices: the next turn of a chat (the whole conversation sent again) starts answering after
decoding only the new messages, with the answer a cold model gives.  Not to the last bit: llama.cpp's CPU
attention computes a prompt decoded in two pieces slightly differently from one decoded in one piece (logits
differ by up to ~0.5 here; batching with other sequences changes nothing), as llama.cpp's server says of its
own prompt cache, so a greedy answer can part from the cold one after a while; the tests compare beginnings.
The model is the real default, loaded in this process with the weights a CPU worker uses; every token
llama.cpp decodes is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.modelstore.store import ModelStore
from workers.engine import LoadedModel, LoadSpec
from workers.slots import common_prefix

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "num_predict": 24}


def beginning(text: str, words: int = 5) -> list[str]:
    return text.split()[:words]


@pytest.fixture()
def decoded_tokens(spy_llama_decode: Callable[[Callable[[Any], None]], None]) -> list[int]:
    """The size of every real ``llama_decode`` batch (the call itself still runs)."""
    sizes: list[int] = []
    spy_llama_decode(lambda batch: sizes.append(int(batch.n_tokens)))
    return sizes


def load(models_dir: Path) -> LoadedModel:
    store = ModelStore(models_dir)
    path = store.blob_path(store.get("smollm2").model_digest)
    return LoadedModel(LoadSpec(path=path, embedding=False, n_ctx=1024, n_gpu_layers=0, n_threads=1, parallel=2,
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
        cold_second, _, _ = answer(cold, history)
        assert sum(decoded_tokens) >= second_prompt  # a cold model decodes the whole conversation
    finally:
        cold.close()
    assert beginning(second) == beginning(cold_second) and len(second.split()) >= 5


def test_a_shorter_prompt_sharing_a_cached_prefix_still_gets_its_own_answer(warm: LoadedModel) -> None:
    """A cached slot holding more than the new prompt (its prompt and answer) must not leak that tail."""
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    once, _, _ = answer(warm, messages)
    again, _, _ = answer(warm, messages)  # the whole prompt is cached: its last token is decoded again
    assert once == again and once


@pytest.fixture()
def decoded_batches(spy_llama_decode: Callable[[Callable[[Any], None]], None]) -> list[list[tuple[int, bool]]]:
    """(sequence id, wants logits) of every token of every real ``llama_decode`` batch."""
    batches: list[list[tuple[int, bool]]] = []
    spy_llama_decode(lambda b: batches.append([(int(b.seq_id[j][0]), bool(b.logits[j])) for j in range(b.n_tokens)]))
    return batches


def test_a_slot_that_ends_early_leaves_no_gap_and_changes_no_neighbour(
    models_dir: Path, decoded_batches: list[list[tuple[int, bool]]]
) -> None:
    """llama.cpp decodes one consecutive run of sequence ids per pass over the weights, so the loop keeps every
    step's sequences in slot order and fills a short gap (here: the middle of three slots, ended early) with a
    throwaway token; that token must not change what the neighbours generate nor stay in the slot's cache."""
    prompts = ["Once upon a time, a dragon", "The river ran past the mill", "In the year 3000, the city"]
    limits = [24, 3, 24]

    def run(model: LoadedModel, together: bool) -> list[str]:
        def start(text: str, limit: int) -> Any:
            return model.start(model.raw_prompt(text), {"temperature": 0, "num_predict": limit}, stops=[], fmt=None,
                               interactive=True, stream=False)

        def text_of(handle: Any) -> str:
            pieces: list[str] = []
            handle.stream(lambda t: pieces.append(t) and False, lambda: False)
            return "".join(pieces)

        if together:
            handles = [start(t, n) for t, n in zip(prompts, limits)]
            return [text_of(h) for h in handles]
        return [text_of(start(t, n)) for t, n in zip(prompts, limits)]

    store = ModelStore(models_dir)
    path = store.blob_path(store.get("smollm2").model_digest)
    spec = LoadSpec(path=path, embedding=False, n_ctx=256, n_gpu_layers=0, n_threads=1, parallel=3, weights="q8_0")
    model = LoadedModel(spec)
    try:
        together = run(model, together=True)
        steps = list(decoded_batches)
        # and the middle slot's cache is still exactly its own: the same prompt again gives the same text
        again = run(model, together=False)[1]
    finally:
        model.close()
    alone_model = LoadedModel(spec)
    try:
        alone = run(alone_model, together=False)
    finally:
        alone_model.close()

    assert together == alone and again == alone[1]
    filled = [b for b in steps if (1, False) in b and not any(s == 1 and wants for s, wants in b)
              and {0, 2} <= {s for s, _ in b}]
    assert filled, "slot 1 ended early but no step filled its gap"
    for batch in steps:
        first_seen = list(dict.fromkeys(s for s, _ in batch))
        assert first_seen == list(range(first_seen[0], first_seen[0] + len(first_seen))), first_seen


def test_concurrent_prompts_with_one_system_prompt_prefill_it_once(
    models_dir: Path, decoded_tokens: list[int]
) -> None:
    """A prompt whose prefix another slot holds (a shared system prompt) starts from a copy of that slot's
    cache instead of decoding the prefix again, and answers as a cold model does."""
    system = {"role": "system", "content": "You answer in one short sentence, as a patient geography teacher. " * 6}
    questions = ["Where is the Danube?", "What is the longest river?", "Name a river in Peru."]
    messages = [[system, {"role": "user", "content": q}] for q in questions]
    store = ModelStore(models_dir)
    path = store.blob_path(store.get("smollm2").model_digest)
    spec = LoadSpec(path=path, embedding=False, n_ctx=1024, n_gpu_layers=0, n_threads=1, parallel=3, weights="q8_0")

    def ask_together(model: LoadedModel, batch: list[list[dict[str, str]]]) -> list[str]:
        handles = []
        for m in batch:
            prompt, stops = model.chat_prompt(m)
            handles.append(model.start(prompt, GREEDY, stops=stops, fmt=None, interactive=True, stream=False))
        texts = []
        for h in handles:
            pieces: list[str] = []
            h.stream(lambda t, pieces=pieces: pieces.append(t) and False, lambda: False)
            texts.append("".join(pieces))
        return texts

    model = LoadedModel(spec)
    try:
        prompts = [model.chat_prompt(m)[0] for m in messages]
        answer(model, messages[0])  # slot 0 now holds the system prompt
        decoded_tokens.clear()
        warm = ask_together(model, messages[1:])  # one goes to slot 0, the other to an empty slot
        warm_decoded = sum(decoded_tokens)
    finally:
        model.close()
    cold_model = LoadedModel(spec)
    try:
        decoded_tokens.clear()
        cold = ask_together(cold_model, messages[1:])
        cold_decoded = sum(decoded_tokens)
    finally:
        cold_model.close()

    shared = common_prefix(prompts[1], prompts[2])
    assert shared > 80
    assert [beginning(t) for t in warm] == [beginning(t) for t in cold] and all(len(t.split()) >= 5 for t in warm)
    # Neither decodes the system prompt again: one finds it in its slot, the other copies that slot's cache.
    rest = len(prompts[1]) + len(prompts[2]) - 2 * shared
    assert warm_decoded <= rest + 2 * GREEDY["num_predict"] + 8, (warm_decoded, rest, shared)
    assert cold_decoded >= warm_decoded + shared - 8  # the cold model decodes it at least once
