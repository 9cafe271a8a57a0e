"""Images tagged into prompts as Ollama's ``imageTaggedMessages`` tags them, and the API's bounds on them."""

from __future__ import annotations

import base64

import pytest

from corral.errors import BadRequest, PayloadTooLarge
from corral.images import MAX_IMAGE_BYTES, MAX_IMAGES, check_images, tag_messages, tag_prompt, tag_request

A, B, C = (base64.b64encode(x).decode() for x in (b"a", b"b", b"c"))


def test_images_become_tags_numbered_across_the_chat() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": [A, B]},
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": "And [img] here?", "images": [C]},
    ]
    tagged, images = tag_messages(messages)
    assert [m["content"] for m in tagged] == ["Be brief.", "[img-0][img-1]What is this?", "Two cats.", "And [img-2] here?"]
    assert images == [A, B, C] and all("images" not in m for m in tagged)
    assert messages[1]["images"] == [A, B]  # the caller's messages are left as they were


def test_a_generate_prompt_gets_its_tags_in_front_unless_raw_already_has_them() -> None:
    assert tag_prompt("Describe it.", [A, B]) == "[img-0][img-1]Describe it."
    assert tag_prompt("<s>[img-0] Describe it.", [A], raw=True) == "<s>[img-0] Describe it."
    assert tag_request("generate", {"prompt": "Hi", "images": [A]})["prompt"] == "[img-0]Hi"
    assert tag_request("generate", {"prompt": "Hi"}) == {"prompt": "Hi"}
    chat = tag_request("chat", {"messages": [{"role": "user", "content": "Hi", "images": [A]}]})
    assert chat["messages"][0]["content"] == "[img-0]Hi" and chat["images"] == [A]


def test_what_must_not_reach_llama_cpp_is_refused() -> None:
    with pytest.raises(BadRequest, match="not base64"):
        check_images(["not base64!"])
    with pytest.raises(BadRequest, match="too many images"):
        check_images([A] * (MAX_IMAGES + 1))
    big = base64.b64encode(b"\0" * (MAX_IMAGE_BYTES // 2 + 1)).decode()
    with pytest.raises(PayloadTooLarge):
        check_images([big, big])
    with pytest.raises(BadRequest, match="not base64"):
        tag_request("chat", {"messages": [{"role": "user", "content": "?", "images": ["%%%"]}]})
