"""Fill-in-the-middle (``suffix``), on models built for the test: a copy of SmolLM2 whose GGUF names FIM token ids
(written with the ``gguf`` package; SmolLM2 has no FIM training, so ids of three of its special tokens stand in:
what is tested is the prompt corral builds from them), and a SmolLM2 with an Ollama TEMPLATE that reads
``.Suffix``.  Models without either keep Ollama's 400."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from corral.modelstore.catalog import packaged_smollm2
from tests.ggufs import with_metadata
from tests.helpers import MODEL

PREFIX, SUFFIX = "def add(a, b):\n    return", "\n\nprint(add(1, 2))\n"
FEW = {"temperature": 0, "num_predict": 6}
FIM_IDS = {"tokenizer.ggml.fim_pre_token_id": 3, "tokenizer.ggml.fim_suf_token_id": 4,
           "tokenizer.ggml.fim_mid_token_id": 5}


@pytest.fixture(scope="module")
def fim_model(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    source = packaged_smollm2()
    assert source is not None
    target = with_metadata(source, tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf", FIM_IDS)
    data = Path(target).read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{base_url}/api/blobs/{digest}", content=data, timeout=60).status_code in (200, 201)
    r = httpx.post(base_url + "/api/create", timeout=120,
                   json={"model": "smol-fim", "files": {"smollm2-fim.gguf": digest}, "stream": False})
    assert r.json() == {"status": "success"}, r.text
    yield "smol-fim"
    httpx.request("DELETE", base_url + "/api/delete", json={"model": "smol-fim"})


def tokens(text: str) -> int:
    import llama_cpp

    llm = llama_cpp.Llama(str(packaged_smollm2()), vocab_only=True, verbose=False)
    try:
        return len(llm.tokenize(text.encode(), add_bos=False, special=False))
    finally:
        llm.close()


def generate(base_url: str, **body: object) -> httpx.Response:
    return httpx.post(base_url + "/api/generate", timeout=120, json={"stream": False, "options": FEW, **body})


def test_the_gguf_fim_tokens_frame_prefix_and_suffix(base_url: str, fim_model: str) -> None:
    assert "insert" in httpx.post(base_url + "/api/show", json={"model": fim_model}).json()["capabilities"]
    reply = generate(base_url, model=fim_model, prompt=PREFIX, suffix=SUFFIX).json()
    # FIM_PRE prefix FIM_SUF suffix FIM_MID, and nothing else (no chat template around it)
    assert reply["prompt_eval_count"] == tokens(PREFIX) + tokens(SUFFIX) + 3 and reply["eval_count"] > 0
    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    text = client.completions.create(model=fim_model, prompt=PREFIX, suffix=SUFFIX, max_tokens=6, temperature=0)
    assert text.usage is not None and text.usage.prompt_tokens == reply["prompt_eval_count"]
    assert text.choices[0].text == reply["response"]


def test_a_template_with_suffix_and_models_without(base_url: str) -> None:
    template = "<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>"
    r = httpx.post(base_url + "/api/create", json={"model": "smol-psm", "from": MODEL, "template": template, "stream": False})
    assert r.json() == {"status": "success"}
    try:
        assert httpx.post(base_url + "/api/show", json={"model": "smol-psm"}).json()["capabilities"] == ["completion", "insert"]
        bare = generate(base_url, model="smol-psm", prompt=PREFIX).json()["prompt_eval_count"]
        filled = generate(base_url, model="smol-psm", prompt=PREFIX, suffix=SUFFIX).json()["prompt_eval_count"]
        assert filled - bare == tokens(SUFFIX)  # the suffix went where the template put .Suffix
    finally:
        httpx.request("DELETE", base_url + "/api/delete", json={"model": "smol-psm"})
    r = generate(base_url, model=MODEL, prompt=PREFIX, suffix=SUFFIX)
    assert (r.status_code, r.json()) == (400, {"error": f"{MODEL}:latest does not support insert"})
