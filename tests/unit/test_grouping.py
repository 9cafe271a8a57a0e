"""Prefix grouping at submission (jobs/grouping.py): which prompts share chunks, and that nothing else moves."""

from __future__ import annotations

from jobs.grouping import grouped, prompt_key, window_size


def test_prompts_that_share_a_prefix_become_neighbours_in_input_order() -> None:
    rubric_a, rubric_b = "Grade this essay for clarity. " * 20, "Translate into French. " * 20
    window = [(n, f"id-{n}", {"prompt": (rubric_a if n % 2 else rubric_b) + f"input {n}"}) for n in range(6)]
    order = [seq for seq, _, _ in grouped("generate", window)]
    assert order == [1, 3, 5, 0, 2, 4]  # each rubric's prompts together, each group still in input order


def test_the_system_prompt_and_chat_history_lead_the_key() -> None:
    terse, verbose = {"system": "Be terse.", "prompt": "Hi"}, {"system": "Be verbose.", "prompt": "A"}
    assert prompt_key("generate", terse) < prompt_key("generate", verbose)
    first = prompt_key("chat", {"messages": [{"role": "system", "content": "Rubric"}, {"role": "user", "content": "b"}]})
    second = prompt_key("chat", {"messages": [{"role": "system", "content": "Rubric"}, {"role": "user", "content": "a"}]})
    assert first.startswith(second[:-1]) and second < first


def test_embedding_inputs_keep_their_order() -> None:
    window = [(n, None, {"input": text}) for n, text in enumerate(["b", "a", "c"])]
    assert grouped("embed", window) == window


def test_windows_hold_whole_chunks() -> None:
    assert window_size(16) == 10_000 and window_size(7) % 7 == 0 and window_size(20_000) == 20_000
