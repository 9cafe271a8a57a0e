"""Images through a real worker: a model created from SmolLM2's GGUF and a vision projector (``mmproj``) is
served through llama.cpp's multimodal library, on Ollama's, OpenAI's and the batch routes.

No vision model is available offline, so the projector is one the test writes with the ``gguf`` package
(tests/ggufs.py ``vision_projector``: a LLaVA-style MLP projector with random weights for SmolLM2's 576-wide
embeddings).  It sees without understanding, so the tests check what a user can check of any vision model: the
answer depends on the image (two images, two answers; the same image, the same answer), the image takes its
positions in ``prompt_eval_count``, and every route gives the same answer for the same image and prompt.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import openai
import pytest

from corral.modelstore.store import ModelStore
from corral.settings import Settings
from tests.ggufs import png, vision_projector
from tests.helpers import MODEL, cli, results, submit, wait_done

VISION = "smolvision"
GREEDY = {"temperature": 0, "num_predict": 12}
QUESTION = "What is in this picture?"
IMAGE_POSITIONS = 4  # (28 / 14) ** 2 patches


def image(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    return base64.b64encode(png(pixels)).decode()


def upload(base_url: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{base_url}/api/blobs/{digest}", content=data, timeout=60).status_code in (200, 201)
    return digest


@pytest.fixture(scope="module")
def vision(base_url: str, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SmolLM2 with a projector: ``FROM`` its GGUF and ``FROM ./mmproj.gguf``, as ``ollama create`` sends them."""
    model_blob = "sha256:" + ModelStore(settings.models_dir).get(MODEL).model_digest
    projector = upload(base_url, vision_projector(tmp_path_factory.mktemp("vision") / "mmproj.gguf").read_bytes())
    r = httpx.post(base_url + "/api/create", timeout=300, json={
        "model": VISION, "stream": False, "files": {"model.gguf": model_blob, "mmproj.gguf": projector}})
    assert r.json() == {"status": "success"}, r.text
    yield VISION
    httpx.request("DELETE", base_url + "/api/delete", json={"model": VISION})


def generate(base_url: str, prompt: str = QUESTION, **body: Any) -> dict[str, Any]:
    r = httpx.post(base_url + "/api/generate", timeout=120, json={
        "model": VISION, "prompt": prompt, "stream": False, "options": GREEDY, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_the_projector_makes_a_vision_model_whose_answer_depends_on_the_image(base_url: str, vision: str) -> None:
    shown = httpx.post(base_url + "/api/show", json={"model": vision}).json()
    assert "vision" in shown["capabilities"]
    assert shown["projector_info"]["clip.projector_type"] == "mlp"  # the projector's metadata, as Ollama shows it
    assert "projector_info" not in httpx.post(base_url + "/api/show", json={"model": MODEL}).json()
    tags = {m["name"]: m for m in httpx.get(base_url + "/api/tags").json()["models"]}
    assert "vision" in tags[f"{vision}:latest"]["capabilities"]
    assert "vision" not in tags[f"{MODEL}:latest"]["capabilities"]

    plain = generate(base_url)
    first, second, again = (generate(base_url, images=[image(seed)]) for seed in (1, 2, 1))
    assert first["response"] != second["response"], "two images, one answer: the image never reached the model"
    assert first["response"] == again["response"] != plain["response"]
    # the image's positions are part of the prompt: its [img-0] tag became 4 embeddings
    assert first["prompt_eval_count"] == plain["prompt_eval_count"] + IMAGE_POSITIONS

    # The same image and question through the chat route, the ollama client and the openai client: one answer.
    chat = httpx.post(base_url + "/api/chat", timeout=120, json={"model": vision, "stream": False, "options": GREEDY,
        "messages": [{"role": "user", "content": QUESTION, "images": [image(1)]}]}).json()
    assert chat["message"]["content"] == first["response"]
    client = ollama.Client(host=base_url)
    streamed = "".join(part.message.content or "" for part in client.chat(
        model=vision, stream=True, options=GREEDY,
        messages=[{"role": "user", "content": QUESTION, "images": [base64.b64decode(image(1))]}]))
    assert streamed == first["response"]
    oai = openai.OpenAI(base_url=base_url + "/v1", api_key="unused").chat.completions.create(
        model=vision, temperature=0, max_tokens=12, messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image(1)}}]}])
    # OpenAI's parts become messages of their own (text, then image), as Ollama's OpenAI layer makes them
    assert oai.choices[0].message.content
    reordered = httpx.post(base_url + "/api/chat", timeout=120, json={"model": vision, "stream": False,
        "options": GREEDY, "messages": [{"role": "user", "content": QUESTION},
                                        {"role": "user", "content": "", "images": [image(1)]}]}).json()
    assert oai.choices[0].message.content == reordered["message"]["content"]


def test_a_chats_next_turn_keeps_its_image(base_url: str, vision: str) -> None:
    """The image of an earlier turn is still seen (and its cells reused) when the whole chat is sent again."""
    turn = [{"role": "user", "content": QUESTION, "images": [image(3)]}]
    body = {"model": vision, "stream": False, "options": GREEDY}
    first = httpx.post(base_url + "/api/chat", timeout=120, json={**body, "messages": turn}).json()
    follow = [*turn, first["message"], {"role": "user", "content": "Say more."}]
    with_image = httpx.post(base_url + "/api/chat", timeout=120, json={**body, "messages": follow}).json()
    other = [{**turn[0], "images": [image(4)]}, first["message"], follow[-1]]
    with_other = httpx.post(base_url + "/api/chat", timeout=120, json={**body, "messages": other}).json()
    assert with_image["message"]["content"] != with_other["message"]["content"]
    assert with_image["prompt_eval_count"] == with_other["prompt_eval_count"]


def test_bad_images_are_a_400_and_the_model_keeps_serving(base_url: str, vision: str) -> None:
    r = httpx.post(base_url + "/api/generate", json={"model": vision, "prompt": "?", "images": ["not base64!"]})
    assert r.status_code == 400 and r.json()["error"].startswith("invalid image input"), r.text
    text = base64.b64encode(b"this is not a picture").decode()
    r = httpx.post(base_url + "/api/generate", timeout=60, json={"model": vision, "prompt": "?", "images": [text]})
    assert r.status_code == 400 and r.json()["error"].startswith("failed to process image 0"), r.text
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": vision, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "invalid image input"
    assert generate(base_url, images=[image(1)])["response"]


def test_batch_items_with_images(base_url: str, vision: str) -> None:
    sync = [generate(base_url, images=[image(seed)])["response"] for seed in (1, 2)]
    job = submit(base_url, model=vision, options=GREEDY, items=[
        {"custom_id": str(seed), "prompt": QUESTION, "images": [image(seed)]} for seed in (1, 2)])
    assert wait_done(base_url, job["id"])["status"] == "completed"
    assert [line["response"]["response"] for line in results(base_url, job["id"])] == sync


def test_a_projector_made_for_another_model_fails_at_create(base_url: str, tmp_path: Path, settings: Settings) -> None:
    model_blob = "sha256:" + ModelStore(settings.models_dir).get(MODEL).model_digest
    wrong = upload(base_url, vision_projector(tmp_path / "mmproj.gguf", n_embd_text=64).read_bytes())
    r = httpx.post(base_url + "/api/create", timeout=300, json={
        "model": "smolvision-wrong", "stream": False, "files": {"model.gguf": model_blob, "mmproj.gguf": wrong}})
    assert r.status_code == 400 and "cannot use the vision projector" in r.json()["error"], r.text
    assert "smolvision-wrong:latest" not in {m["name"] for m in httpx.get(base_url + "/api/tags").json()["models"]}


def test_a_modelfile_with_a_second_from_adds_the_projector(base_url: str, vision: str, tmp_path: Path) -> None:
    """``FROM smollm2`` then ``FROM ./mmproj.gguf``: the CLI uploads the projector, the server keeps the model's
    layers and adds it (the same projector makes the same vision model)."""
    vision_projector(tmp_path / "mmproj.gguf")
    (tmp_path / "Modelfile").write_text(f"FROM {MODEL}\nFROM ./mmproj.gguf\nSYSTEM You describe pictures.\n")
    result = cli(base_url, "create", "smolvision-cli", "-f", str(tmp_path / "Modelfile"))
    assert result.exit_code == 0, result.output
    try:
        shown = httpx.post(base_url + "/api/show", json={"model": "smolvision-cli"}).json()
        assert "vision" in shown["capabilities"] and shown["system"] == "You describe pictures."
        body = {"prompt": QUESTION, "images": [image(1)], "system": "You describe pictures."}
        assert generate(base_url, model="smolvision-cli", **body)["response"] == generate(base_url, **body)["response"]
    finally:
        httpx.request("DELETE", base_url + "/api/delete", json={"model": "smolvision-cli"})
