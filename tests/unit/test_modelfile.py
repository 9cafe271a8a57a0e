"""Modelfiles read as Ollama's parser reads them, into the /api/create body `corral create` sends."""

from __future__ import annotations

import pytest

from corral.errors import BadRequest
from corral.modelstore.modelfile import create_body, parse_modelfile

MODELFILE = '''
# a house assistant
FROM ./smollm2.gguf
PARAMETER temperature 0.2
PARAMETER num_ctx 2048
PARAMETER stop "<|im_end|>"
PARAMETER stop ###
SYSTEM """You are the house assistant.
Answer in one sentence."""
MESSAGE user Hello
message assistant "Hi! How can I help?"
LICENSE """MIT License
Copyright"""
'''


def test_a_modelfile_becomes_a_create_body() -> None:
    assert create_body(parse_modelfile(MODELFILE)) == {
        "from": "./smollm2.gguf",
        "system": "You are the house assistant.\nAnswer in one sentence.",
        "parameters": {"temperature": 0.2, "num_ctx": 2048, "stop": ["<|im_end|>", "###"]},
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
        "license": ["MIT License\nCopyright"],
    }


def test_one_line_triple_quotes_and_bare_values() -> None:
    assert create_body(parse_modelfile('FROM smollm2\nSYSTEM """Be brief."""\nTEMPLATE {{ .Prompt }}')) == {
        "from": "smollm2", "system": "Be brief.", "template": "{{ .Prompt }}",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PARAMETER temperature 0.2", "the Modelfile has no FROM line"),
        ("FROM x\nSAY hello", 'line 2: unknown command "SAY"'),
        ('FROM x\nSYSTEM """never closed', 'unterminated """'),
        ("FROM x\nPARAMETER num_ctx lots", 'PARAMETER num_ctx: "lots" must be of type integer'),
        ("FROM x\nPARAMETER top_k", "line 2: PARAMETER needs a name and a value"),
    ],
)
def test_mistakes_are_clear(text: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        create_body(parse_modelfile(text))
