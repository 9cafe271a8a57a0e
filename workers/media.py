"""Images for models with a projector (an ``application/vnd.ollama.image.projector`` layer), through llama.cpp's
multimodal library (libmtmd, which llama-cpp-python builds and binds as ``llama_cpp.mtmd_cpp``).

How an image reaches the model, as Ollama's server and runner do it: the API tags each image into the prompt's
text as ``[img-N]`` (corral/images.py), the template renders the prompt, and each tag is then swapped for
libmtmd's media marker.  ``mtmd_tokenize`` cuts the prompt into text chunks (token ids) and image chunks (the image, resized and
normalised as the projector wants, and the number of positions its embeddings take).

The decode loop (workers/decode_loop.py) holds a prompt as a list of token ids; an image's positions are held as
negative ids derived from the image's bytes (:func:`placeholders`), so that two prompts with the same image at
the same place share that prefix in a slot's cache (a chat's next turn does not encode its image again) and two
different images never do.  When a sequence's prefill reaches an image, the loop encodes it and decodes its
embeddings into the sequence's cells (:meth:`MediaPrompt.evaluate`, on the compute thread), then goes on with
the text after it in its ordinary batched steps.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import BadRequest, GenerationFailed
from corral.images import IMAGE_TAG, decode
from workers import compute


def decode_images(images: list[str]) -> list[bytes]:
    """The images' bytes (the API checked them: this is the worker's own guard)."""
    return [decode(image) for image in images]


def placeholders(identity: bytes, count: int) -> list[int]:
    """The ids that stand for an image's ``count`` positions in a prompt's token list: negative (never a real
    token), the same for the same image at the same place, different for different images."""
    base = int.from_bytes(hashlib.sha256(identity).digest()[:5], "big") << 20
    return [-(1 + base + k) for k in range(count)]


@dataclass
class Span:
    """One image's positions in a prompt: ``start`` (index in the token list), ``length``, its mtmd chunk."""

    start: int
    length: int
    chunk: Any


@dataclass
class MediaPrompt:
    """A tokenized prompt with images: ids (placeholders at the images' positions) and the image chunks.  Owns
    the mtmd chunk list until :meth:`close` (the decode loop closes it when the sequence ends)."""

    tokens: list[int]
    spans: list[Span]
    projector: Projector
    _chunks: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def span_at(self, index: int) -> Span | None:
        return next((s for s in self.spans if s.start == index), None)

    def inside(self, index: int) -> Span | None:
        """The span that ``index`` falls strictly inside (not at its start), if any."""
        return next((s for s in self.spans if s.start < index < s.start + s.length), None)

    def next_start(self, index: int) -> int:
        """Where the next image at or after ``index`` starts (the end of the prompt when none)."""
        return min((s.start for s in self.spans if s.start >= index), default=len(self.tokens))

    def prepend(self, tokens: list[int]) -> None:
        """Put ``tokens`` (a generate request's ``context``) in front of the prompt."""
        self.tokens = list(tokens) + self.tokens
        for span in self.spans:
            span.start += len(tokens)

    def evaluate(self, span: Span, ctx: Any, n_past: int, seq_id: int, n_batch: int) -> None:
        """Encode the image and decode its embeddings into ``seq_id``'s cells from position ``n_past``."""
        self.projector.evaluate(span.chunk, ctx, n_past, seq_id, n_batch)

    def close(self) -> None:
        with self._lock:
            chunks, self._chunks = self._chunks, None
        if chunks is not None:
            self.projector.mtmd.mtmd_input_chunks_free(chunks)


class Projector:
    """A model's projector, loaded by libmtmd onto the model's weights (one per loaded model)."""

    def __init__(self, path: Path, model: Any, *, n_threads: int, use_gpu: bool) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback

        self.mtmd = mtmd
        self._llama_cpp = llama_cpp
        mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))  # quiet unless llama.cpp's log is verbose
        mtmd.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        # Loading runs a warm-up encode: llama.cpp's compute stays on one thread (workers/compute.py).
        self.ctx = compute.run(mtmd.mtmd_init_from_file, str(path).encode(), model, params)
        if not self.ctx:
            raise GenerationFailed(f"failed to load the projector {path.name}: llama.cpp cannot use it with this model")
        if not mtmd.mtmd_support_vision(self.ctx):
            mtmd.mtmd_free(self.ctx)
            raise GenerationFailed(f"the projector {path.name} has no vision encoder")
        self.marker: str = mtmd.mtmd_default_marker().decode()
        self._lock = threading.Lock()  # tokenizing (image preprocessing) from several request threads

    def prompt(self, text: str, images: list[bytes], *, add_special: bool) -> MediaPrompt:
        """Tokenize ``text`` whose ``[img-N]`` tags stand for ``images``: ids with placeholders, and the spans."""
        mtmd = self.mtmd
        order: list[int] = []

        def marker(match: re.Match[str]) -> str:
            n = int(match.group(1))
            if n >= len(images):
                return match.group(0)  # a tag with no image: plain text, as Ollama leaves it
            order.append(n)
            return self.marker
        body = IMAGE_TAG.sub(marker, text)
        bitmaps = []
        chunks = None
        try:
            for n in order:
                data = images[n]
                buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
                bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buffer, len(data), False)
                if not bitmap:
                    raise BadRequest(f"failed to process image {n}: not an image format llama.cpp can read "
                                     "(PNG, JPEG, GIF, BMP and the like)")
                bitmaps.append(bitmap)
                mtmd.mtmd_bitmap_set_id(bitmap, hashlib.sha256(data).hexdigest().encode())
            encoded = body.encode()
            text_in = mtmd.mtmd_input_text()
            text_in.text, text_in.text_len = encoded, len(encoded)
            text_in.add_special, text_in.parse_special = add_special, True
            chunks = mtmd.mtmd_input_chunks_init()
            array = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            with self._lock:
                rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text_in), array, len(bitmaps))
            if rc != 0:
                raise BadRequest(f"failed to process the images (llama.cpp's mtmd_tokenize returned {rc})")
            tokens: list[int] = []
            spans: list[Span] = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t(0)
                    pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    tokens.extend(pointer[k] for k in range(count.value))
                    continue
                length = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
                spans.append(Span(len(tokens), length, chunk))
                # the image's digest (its bitmap id) and the chunk's place: an image cut into several chunks
                # (tiles) gets different ids for each
                identity = (mtmd.mtmd_input_chunk_get_id(chunk) or b"") + b":" + str(i).encode()
                tokens.extend(placeholders(identity, length))
            if spans and spans[-1].start + spans[-1].length == len(tokens):
                raise BadRequest("the prompt must have text after its last image")
            result = MediaPrompt(tokens, spans, self, chunks)
            chunks = None
            return result
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)

    def evaluate(self, chunk: Any, ctx: Any, n_past: int, seq_id: int, n_batch: int) -> None:
        new_past = self._llama_cpp.llama_pos(0)
        rc = compute.run(self.mtmd.mtmd_helper_eval_chunk_single, self.ctx, ctx, chunk, n_past, seq_id, n_batch,
                         False, ctypes.byref(new_past))
        if rc != 0:
            raise GenerationFailed(f"encoding an image failed (llama.cpp returned {rc})")

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
