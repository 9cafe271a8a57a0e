"""`corral create -f Modelfile` against a live server: a local GGUF (or ADAPTER) is uploaded only when the server
lacks it, `-q` quantizes, the layers come back from `corral show`, and a mistake is one clear line."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from corral.modelstore.convert_bert import packaged_minilm
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from tests.ggufs import lora_adapter
from tests.helpers import EMBED_MODEL, MODEL, cli, no_traceback


def test_create_from_a_local_gguf_uploads_it_once(base_url: str, settings: Settings, tmp_path: Path) -> None:
    gguf = bytearray(ModelStore(settings.models_path).get(MODEL).model_path.read_bytes())
    gguf[-1] ^= 0xFF  # another file (its last weight byte differs): the server does not have it yet
    (tmp_path / "tuned.gguf").write_bytes(gguf)
    (tmp_path / "Modelfile").write_text(
        'FROM ./tuned.gguf\nSYSTEM """You are the house assistant."""\nPARAMETER num_predict 4\nPARAMETER stop ###\n'
    )
    try:
        first = cli(base_url, "create", "house-tuned", "-f", str(tmp_path / "Modelfile"))
        assert first.exit_code == 0, first.output
        assert "created 'house-tuned'" in first.stdout and "creating new layer" in first.stderr
        blobs = sorted(p.name for p in (settings.models_path / "blobs").iterdir())
        again = cli(base_url, "create", "house-tuned-2", "-f", str(tmp_path / "Modelfile"))
        assert again.exit_code == 0, again.output
        assert sorted(p.name for p in (settings.models_path / "blobs").iterdir()) == blobs  # nothing new uploaded
        system = cli(base_url, "show", "house-tuned", "--system")
        assert system.stdout.strip() == "You are the house assistant."
        parameters = cli(base_url, "show", "house-tuned", "--parameters").stdout.split()
        assert parameters == ["num_predict", "4", "stop", '"###"']
        assert "FROM " in cli(base_url, "show", "house-tuned", "--modelfile").stdout
    finally:
        for name in ("house-tuned", "house-tuned-2"):
            httpx.request("DELETE", base_url + "/api/delete", json={"model": name})


def test_create_from_a_model_and_modelfile_mistakes(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "Modelfile").write_text(f"FROM {MODEL}\nPARAMETER temperature 0\nMESSAGE user Hi\nMESSAGE assistant Hello!\n")
    made = cli(base_url, "create", "greeter", "-f", str(tmp_path / "Modelfile"))
    assert made.exit_code == 0, made.output
    shown = httpx.post(base_url + "/api/show", json={"model": "greeter"}).json()
    assert shown["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "Bad").write_text(f"FROM {MODEL}\nSAY hello\n")
    bad = cli(base_url, "create", "broken", "-f", str(tmp_path / "Bad"))
    assert bad.exit_code == 1 and bad.stderr.strip() == f'Error: {tmp_path / "Bad"}: line 2: unknown command "SAY" ' \
        "(expected one of FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER, MESSAGE, LICENSE)"
    no_traceback(bad)
    missing = cli(base_url, "create", "broken", "-f", str(tmp_path / "Modelfile2"))
    assert missing.exit_code == 2  # click: the file does not exist
    httpx.request("DELETE", base_url + "/api/delete", json={"model": "greeter"})


def test_create_with_an_adapter_file_and_quantize(base_url: str, settings: Settings, tmp_path: Path) -> None:
    lora_adapter(ModelStore(settings.models_path).get(MODEL).model_path, tmp_path / "tone.gguf")
    (tmp_path / "Modelfile").write_text(f"FROM {MODEL}\nADAPTER ./tone.gguf\n")
    (tmp_path / "Embed").write_text(f"FROM {EMBED_MODEL}\n")
    try:
        made = cli(base_url, "create", "toned", "-f", str(tmp_path / "Modelfile"))
        assert made.exit_code == 0, made.output
        assert "\nADAPTER " in cli(base_url, "show", "toned", "--modelfile").stdout
        small = cli(base_url, "create", "minilm-small", "-f", str(tmp_path / "Embed"), "-q", "q8_0")
        assert small.exit_code == 0 and "quantizing F16 model to Q8_0" in small.stderr, small.output
        shown = httpx.post(base_url + "/api/show", json={"model": "minilm-small"}).json()
        assert shown["details"]["quantization_level"] == "Q8_0"
        refused = cli(base_url, "create", "toned-q", "-f", str(tmp_path / "Modelfile"), "-q", "q8_0")
        assert refused.exit_code == 1 and refused.stderr.startswith("Error: quantization is only supported for F16")
        no_traceback(refused)
    finally:
        for name in ("toned", "minilm-small"):
            httpx.request("DELETE", base_url + "/api/delete", json={"model": name})


def test_create_from_a_safetensors_directory_converts_it(base_url: str, tmp_path: Path) -> None:
    source = packaged_minilm()
    assert source is not None
    (tmp_path / "Modelfile").write_text(f"FROM {source}\n")
    try:
        made = cli(base_url, "create", "minilm-converted", "-f", str(tmp_path / "Modelfile"))
        assert made.exit_code == 0 and "converting model" in made.stderr, made.output
        shown = httpx.post(base_url + "/api/show", json={"model": "minilm-converted"}).json()
        assert shown["details"]["family"] == "bert" and shown["capabilities"] == ["embedding"]
        texts = ["A converted model.", "Das gleiche Modell."]
        ours, packaged = (
            httpx.post(base_url + "/api/embed", json={"model": m, "input": texts}, timeout=60).json()["embeddings"]
            for m in ("minilm-converted", EMBED_MODEL)
        )
        assert np.allclose(ours, packaged, atol=1e-6)  # the same weights as the default model's conversion
    finally:
        httpx.request("DELETE", base_url + "/api/delete", json={"model": "minilm-converted"})
