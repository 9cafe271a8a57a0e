"""Images in requests, as Ollama's server takes them: checked at the API, tagged into the prompt's text.

Each image of a message becomes an ``[img-N]`` tag in front of the message's text, or replaces an ``[img]`` the
text already has (Ollama's ``imageTaggedMessages``), numbered across the whole request; a generate request's
images go in front of its prompt the same way.  The API tags a request before its template renders it (a Go
TEMPLATE layer renders the tags like any text), and sends the images along, in tag order; a worker swaps each
tag for llama.cpp's media marker (workers/media.py).

Every value that reaches llama.cpp is bounded here: at most :data:`MAX_IMAGES` images of at most
:data:`MAX_IMAGE_BYTES` in all, each valid base64.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from corral.errors import BadRequest, PayloadTooLarge

IMAGE_TAG = re.compile(r"\[img-(\d+)\]")
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 32 << 20  # decoded, all of a request's images together


def tag_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages with their ``images`` turned into ``[img-N]`` tags in their text, and the images in tag order."""
    tagged: list[dict[str, Any]] = []
    images: list[str] = []
    for message in messages:
        if not message.get("images"):
            tagged.append(message)
            continue
        message = dict(message)
        content = str(message.get("content") or "")
        prefix = ""
        for image in message.pop("images"):
            tag = f"[img-{len(images)}]"
            images.append(image)
            if "[img]" in content:
                content = content.replace("[img]", tag, 1)
            else:
                prefix += tag
        message["content"] = prefix + content
        tagged.append(message)
    return tagged, images


def tag_prompt(prompt: str, images: list[str], *, raw: bool = False) -> str:
    """A generate request's prompt with its images' tags: in front of it, or in place of its ``[img]``s (a raw
    prompt that already has ``[img-N]`` tags keeps them)."""
    if raw and IMAGE_TAG.search(prompt):
        return prompt
    return str(tag_messages([{"content": prompt, "images": images}])[0][0]["content"])


def tag_request(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A generate or chat request's fields with its images tagged into its text and listed in ``images``
    (checked: :func:`check_images`); a request without images is returned as it is."""
    if kind == "chat":
        messages, images = tag_messages(list(fields.get("messages") or []))
        if not images:
            return fields
        fields = {**fields, "messages": messages, "images": images}
    elif kind == "generate" and fields.get("images"):
        images = list(fields["images"])
        fields = {**fields, "prompt": tag_prompt(fields.get("prompt") or "", images, raw=bool(fields.get("raw")))}
    else:
        return fields
    check_images(images)
    return fields


def decode(image: str) -> bytes:
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"invalid image input: not base64 ({exc})") from exc


def check_images(images: list[str]) -> None:
    """Refuse what must not reach llama.cpp: too many images, too many bytes, text that is not base64."""
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"too many images: at most {MAX_IMAGES} per request")
    total = 0
    for image in images:
        if not isinstance(image, str):
            raise BadRequest("invalid image input: each image must be a base64 string")
        total += len(decode(image))
        if total > MAX_IMAGE_BYTES:
            raise PayloadTooLarge(f"the images are too large: at most {MAX_IMAGE_BYTES >> 20} MiB per request")
