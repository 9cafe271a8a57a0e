"""The thinking splitter: reasoning between the model's tags goes to ``thinking``, never to ``content``, however
the stream cuts the tags; a prompt that opened the block starts inside it."""

from __future__ import annotations

import pytest

from corral.errors import BadRequest
from corral.thinking import ThinkingSplitter, check_think, think_from_effort


def split(pieces: list[str], *, inside: bool = False, tags: tuple[str, str] = ("<think>", "</think>")) -> tuple[str, str]:
    splitter = ThinkingSplitter(*tags, inside=inside)
    thinking = content = ""
    for piece in [*pieces, None]:
        t, c = splitter.flush() if piece is None else splitter.feed(piece)
        thinking, content = thinking + t, content + c
    return thinking, content


@pytest.mark.parametrize("cut", range(1, 30))
def test_tags_cut_anywhere_never_leak(cut: int) -> None:
    text = "\n<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4."
    pieces = [text[i:i + cut] for i in range(0, len(text), cut)]
    assert split(pieces) == ("Let me add 2 and 2.", "The answer is 4.")


def test_no_thinking_and_a_prompt_that_opened_the_block() -> None:
    assert split(["The answer", " is 4."]) == ("", "The answer is 4.")
    assert split(["<thi", "nking is fun"]) == ("", "<thinking is fun")  # not the tag after all
    assert split(["Hmm, 2+2", "...</th", "ink>4"], inside=True) == ("Hmm, 2+2...", "4")
    assert split(["still thinking when num_predict ran out </th"], inside=True) == (
        "still thinking when num_predict ran out </th", "")
    assert split(["[THINK]x[/THINK]y"], tags=("[THINK]", "[/THINK]")) == ("x", "y")


def test_think_values_and_openai_efforts() -> None:
    assert [check_think(v) for v in (None, True, False, "low", "max")] == [None, True, False, "low", "max"]
    with pytest.raises(BadRequest, match='invalid think value: "extreme"'):
        check_think("extreme")
    with pytest.raises(BadRequest, match="think must be a boolean or string"):
        check_think(3)
    assert [think_from_effort(e) for e in (None, "none", "minimal", "medium", "xhigh")] == [None, False, "low", "medium", "max"]
    with pytest.raises(BadRequest, match='invalid reasoning value: "lots"'):
        think_from_effort("lots")
