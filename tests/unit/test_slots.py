"""The decode loop's slot and step rules (workers/slots.py), without a model."""

from __future__ import annotations

from workers.slots import MAX_GAP_FILL, common_prefix, donor, gap_fillers, pick_slot, worth_copying


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [6]) == 0


def test_a_prompt_takes_the_free_slot_with_its_longest_cached_prefix() -> None:
    cached = [[9, 9], [1, 2, 3, 4], [1, 2], []]
    assert pick_slot([0, 1, 2, 3], cached, [1, 2, 3, 4, 5]) == 1
    assert pick_slot([0, 2, 3], cached, [1, 2, 3, 4, 5]) == 2  # slot 1 busy: the next best prefix


def test_ties_go_to_the_lowest_slot_so_busy_slots_stay_one_run() -> None:
    cached: list[list[int]] = [[], [], [], []]
    assert pick_slot([3, 1, 2], cached, [7, 8]) == 1
    assert pick_slot([2, 3], [[7], [7], [], []], [5]) == 2  # no shared prefix anywhere: lowest free


def test_the_donor_is_another_slot_with_a_longer_prefix() -> None:
    cached = [[1, 2, 3, 4, 5], [1, 2], [], [1, 2, 3]]
    assert donor(1, cached, [1, 2, 3, 4, 9]) == (0, 4)
    assert donor(0, cached, [1, 2, 3, 4, 9]) == (3, 3)  # never itself
    assert donor(2, [[], [], []], [1]) == (-1, 0)


def test_a_copy_must_bring_enough_tokens_to_pay_for_itself() -> None:
    assert not worth_copying(15, 2048) and worth_copying(16, 2048)
    # a larger context costs more to copy: 1 token per 256 cells
    assert not worth_copying(20, 8192) and worth_copying(32, 8192)


def test_short_gaps_of_idle_slots_get_fillers_long_ones_do_not() -> None:
    assert gap_fillers([0, 2, 3], room=10, busy=set()) == [1]
    assert gap_fillers([0, 3], room=10, busy=set()) == [1, 2]
    assert MAX_GAP_FILL == 2 and gap_fillers([0, 4], room=10, busy=set()) == []  # a gap of 3: a second pass is cheaper
    assert gap_fillers([0, 1, 2], room=10, busy=set()) == []  # already one run


def test_fillers_respect_the_step_budget_and_busy_slots() -> None:
    assert gap_fillers([0, 2, 4], room=1, busy=set()) == [1]  # room for one filler only
    assert gap_fillers([0, 2], room=10, busy={1}) == []  # slot 1 has a sequence (prefilling elsewhere)
