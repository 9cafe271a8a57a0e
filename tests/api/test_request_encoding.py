"""Compressed request bodies (Codex CLI sends zstd): decoded before the view reads them, bounded after decoding,
and refused in an encoding corral cannot decode, in the route family's error shape."""

from __future__ import annotations

import gzip
import json

import zstandard
from flask.testing import FlaskClient

from corral.settings import Settings


def test_a_zstd_body_reads_as_the_plain_one(client: FlaskClient) -> None:
    body = json.dumps({"model": "nope", "input": "hi"}).encode()
    plain = client.post("/v1/responses", data=body, content_type="application/json")
    packed = client.post("/v1/responses", data=zstandard.ZstdCompressor().compress(body),
                         headers={"Content-Encoding": "zstd"}, content_type="application/json")
    assert plain.status_code == packed.status_code == 404  # the model was read from the decoded body
    assert packed.get_json() == plain.get_json()
    gz = client.post("/api/show", data=gzip.compress(json.dumps({"model": "nope"}).encode()),
                     headers={"Content-Encoding": "gzip"}, content_type="application/json")
    assert (gz.status_code, gz.get_json()) == (404, {"error": "model 'nope:latest' not found"})


def test_a_bomb_is_refused_once_decoded_past_the_body_limit(client: FlaskClient, settings: Settings) -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b'{"input": "' + b"a" * (settings.max_body + 10) + b'"}')
    assert len(bomb) < 100_000
    r = client.post("/v1/responses", data=bomb, headers={"Content-Encoding": "zstd"}, content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"]["message"].startswith("the decoded request body is larger")


def test_garbage_and_unknown_encodings_are_client_errors(client: FlaskClient) -> None:
    r = client.post("/v1/responses", data=b"not zstd", headers={"Content-Encoding": "zstd"})
    assert r.status_code == 400 and "cannot be decoded" in r.get_json()["error"]["message"]
    r = client.post("/api/chat", data=b"{}", headers={"Content-Encoding": "br"})
    assert (r.status_code, r.get_json()) == (415, {"error": "Content-Encoding 'br' is not supported (zstd and gzip are)"})


def test_a_compressed_upload_is_refused_not_half_read(client: FlaskClient) -> None:
    r = client.post("/v1/files", data=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
    assert r.status_code == 415 and "without Content-Encoding" in r.get_json()["error"]["message"]


def test_gzip_cut_short_or_with_garbage_is_refused_and_members_and_frames_join(client: FlaskClient) -> None:
    body = json.dumps({"model": "nope"}).encode()
    packed = gzip.compress(body)
    for bad in (packed[:-6], packed + b"junk"):
        r = client.post("/api/show", data=bad, headers={"Content-Encoding": "gzip"}, content_type="application/json")
        assert r.status_code == 400 and "gzip" in r.get_json()["error"], r.get_json()
    halves = gzip.compress(body[:5]) + gzip.compress(body[5:])
    r = client.post("/api/show", data=halves, headers={"Content-Encoding": "gzip"}, content_type="application/json")
    assert r.status_code == 404  # both members read: the model was found missing, not the JSON broken
    frames = zstandard.ZstdCompressor().compress(body[:5]) + zstandard.ZstdCompressor().compress(body[5:])
    r = client.post("/api/show", data=frames, headers={"Content-Encoding": "zstd"}, content_type="application/json")
    assert r.status_code == 404
