"""Keys and body limits at the door, on the in-process app with ``CORRAL_REQUIRE_API_KEY=1``.  What keys do
end to end (the official clients sending them, per-key isolation, revocation, ``corral keys``) is tested
against real processes in tests/integration/test_api_keys.py."""

from __future__ import annotations

import io
import json

import pytest
from flask.testing import FlaskClient

from api import create_app
from corral.errors import BadRequest
from corral.settings import Settings
from jobs.keys import KeyStore
from tests.helpers import MODEL

LIMIT = 1 << 20  # CORRAL_MAX_BODY for this app: 1 MiB


@pytest.fixture()
def keyed_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"require_api_key": True, "max_body": LIMIT})


@pytest.fixture()
def keyed(keyed_settings: Settings) -> FlaskClient:
    return create_app(keyed_settings).test_client()


@pytest.fixture()
def keys(keyed_settings: Settings) -> KeyStore:
    return KeyStore(keyed_settings)


def test_keys_required_on_every_route_but_root(keyed: FlaskClient) -> None:
    assert keyed.get("/").status_code == 200  # liveness stays open
    r = keyed.get("/api/tags")
    assert r.status_code == 401 and r.get_json() == {"error": "missing API key: send 'Authorization: Bearer <key>'"}
    r = keyed.get("/v1/models", headers={"Authorization": "Bearer corral-wrong"})
    assert r.status_code == 401
    assert r.get_json()["error"] == {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}
    r = keyed.get("/api/jobs", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401

def test_body_limits(keyed: FlaskClient, keys: KeyStore) -> None:
    headers = {"Authorization": f"Bearer {keys.create('limits')[0]}", "Content-Type": "application/json"}
    big = json.dumps({"model": MODEL, "prompt": "x" * (LIMIT + 10)})
    r = keyed.post("/api/generate", data=big, headers=headers)
    assert r.status_code == 413 and r.get_json() == {"error": "request body too large"}
    r = keyed.post("/v1/completions", data=big, headers=headers)
    assert r.status_code == 413 and r.get_json()["error"]["message"] == "request body too large"
    # uploads are streamed into the database and have their own (larger) limit: a 1.5 MiB upload is read to
    # its end (here: to its bad last line), not refused for size
    lines = "".join(json.dumps({"prompt": "p" * 1000}) + "\n" for _ in range(1500)) + "{bad\n"
    r = keyed.post(f"/api/jobs?kind=generate&model={MODEL}", data=lines.encode(),
                   headers={**headers, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1501: not valid JSON")


def test_keys_without_limits_of_their_own_get_the_servers_default(settings: Settings) -> None:
    from jobs.keys import KeyLimits

    store = KeyStore(settings.model_copy(update={"key_limits": '{"rpm": 5, "models": ["all-minilm*"]}'}))
    plain, _ = store.create("default-limited")
    own, _ = store.create("own-limits", limits=KeyLimits(tpm=1000))
    assert store.check(plain).limits == KeyLimits(rpm=5, models=["all-minilm*"])  # type: ignore[union-attr]
    assert store.check(own).limits == KeyLimits(tpm=1000)  # type: ignore[union-attr]
    assert not store.check(plain).limits.allows("smollm2") and store.check(plain).limits.allows("all-minilm:l6-v2")  # type: ignore[union-attr]
    with pytest.raises(BadRequest, match="CORRAL_KEY_LIMITS is not valid"):
        KeyStore(settings.model_copy(update={"key_limits": '{"rpm": "many"}'}))


def test_a_file_batch_refused_by_the_keys_queue_limit_leaves_nothing_behind(
        keyed: FlaskClient, keys: KeyStore, keyed_settings: Settings) -> None:
    """The batch, its documents and its job are one transaction: a refusal (here the key's queued-items limit,
    a 429) stores none of them, where the batch row used to stay behind, empty."""
    from sqlalchemy import func, select

    from jobs.db import sessions
    from jobs.keys import KeyLimits
    from jobs.models import CollectionBatch, CollectionDocument

    headers = {"Authorization": f"Bearer {keys.create('one-queued', limits=KeyLimits(max_queued_items=1))[0]}"}
    store = keyed.post("/v1/vector_stores", json={"name": "limited"}, headers=headers).get_json()["id"]
    file_ids = [keyed.post("/v1/files", headers=headers, data={
        "purpose": "assistants", "file": (io.BytesIO(f"Document {n} about rockets.".encode()), f"d{n}.txt")},
        content_type="multipart/form-data").get_json()["id"] for n in range(2)]
    r = keyed.post(f"/v1/vector_stores/{store}/file_batches", json={"file_ids": file_ids}, headers=headers)
    assert r.status_code == 429, r.get_data(as_text=True)
    assert "queued batch items" in r.get_json()["error"]["message"]
    with sessions(keyed_settings)() as session:
        assert session.scalar(select(func.count()).select_from(CollectionBatch)
                              .where(CollectionBatch.collection_id == store)) == 0
        assert session.scalar(select(func.count()).select_from(CollectionDocument)
                              .where(CollectionDocument.collection_id == store)) == 0
