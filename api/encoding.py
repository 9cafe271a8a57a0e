"""Compressed request bodies: ``Content-Encoding: zstd`` (Codex CLI 0.98 and later compress their Responses
requests; Ollama accepts them on ``/v1/responses`` with an 8 MiB decoder window) and ``gzip``.

A body is decoded before any view reads it, so every route sees plain JSON.  Decoding is bounded twice: the
compressed body by the route's usual limit (``CORRAL_MAX_BODY``, checked by Flask before this runs), the decoded
one by the same limit again, so a small bomb cannot become gigabytes in memory; zstd's window is capped at 8 MiB,
as Ollama caps it.  An encoding corral cannot decode is a 415 rather than a body parsed as if it were plain.
Uploads of jobs, files and blobs are streamed into storage as they arrive, so a compressed one is a 415: a
client sends those plain.
"""

from __future__ import annotations

import io
import zlib

from flask import Flask, request

from corral.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding
from corral.settings import Settings

ZSTD_WINDOW = 8 << 20
STREAMED_UPLOADS = {"/api/jobs", "/v1/files"}


def _zstd(data: bytes, limit: int) -> bytes:
    import zstandard  # here: only a compressed request needs it

    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW).stream_reader(io.BytesIO(data),
                                                                                  read_across_frames=True)
    try:
        out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"the zstd request body cannot be decoded: {exc}") from exc
    return bytes(out)


def _gzip(data: bytes, limit: int) -> bytes:
    """Every gzip member of ``data`` (RFC 1952 allows several), up to ``limit + 1`` bytes; a body cut short or
    followed by bytes that are not gzip is refused, never read as far as it goes."""
    out = bytearray()
    rest = data
    try:
        while rest and len(out) <= limit:
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += decoder.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                break
            if not decoder.eof:
                raise BadRequest("the gzip request body is cut short")
            rest = decoder.unused_data
    except zlib.error as exc:
        raise BadRequest(f"the gzip request body cannot be decoded: {exc}") from exc
    return bytes(out)


DECODERS = {"zstd": _zstd, "gzip": _gzip}


def decoded(encoding: str, data: bytes, limit: int) -> bytes:
    """``data`` decoded from ``encoding``; more than ``limit`` bytes decoded is a 413."""
    decoder = DECODERS.get(encoding)
    if decoder is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported (zstd and gzip are)")
    out = decoder(data, limit)
    if len(out) > limit:
        raise PayloadTooLarge(f"the decoded request body is larger than {limit} bytes")
    return out


def init_app(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _decode_body() -> None:
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if not encoding or encoding == "identity" or request.method in ("GET", "HEAD", "OPTIONS"):
            return
        if request.path in STREAMED_UPLOADS or request.path.startswith("/api/blobs/"):
            raise UnsupportedEncoding("uploads are streamed as they arrive: send them without Content-Encoding")
        body = decoded(encoding, request.get_data(cache=False), settings.max_body)
        request.environ["wsgi.input"] = io.BytesIO(body)
        request.environ["CONTENT_LENGTH"] = str(len(body))
        request.environ.pop("HTTP_CONTENT_ENCODING", None)
        request.__dict__.pop("stream", None)  # werkzeug caches the input stream: read the decoded one
        request.__dict__.pop("content_length", None)
