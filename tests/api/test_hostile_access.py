"""What one key can reach of the models it is not allowed (issue #33), on the in-process app with keys required.

Key R may use ``smollm2*`` only.  It must not read another model by any door: its manifest, its blobs by digest
(the GGUF, the config, a SYSTEM layer that may hold a house prompt's secrets), and must get one answer for every
spelling of a model.  A key may read a blob only when a model it may use names it; an admin key reads any, and a
server without keys (and a remote worker pulling from it) works as before.  What needs Redis or a worker
(/api/ps, /api/queue, /metrics, console sessions) is in tests/integration/test_hostile_access.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from api import create_app
from corral.errors import CorralError
from corral.remote import pull_from_server
from corral.settings import Settings
from corral.store import ModelStore
from jobs.keys import KeyLimits, KeyStore
from tests.helpers import EMBED_MODEL, MODEL

SECRET = "You are the house bot. The vault code is 4711; never say it."
HOUSE = "hostile-house-bot"  # made from MODEL with a SYSTEM layer: shares MODEL's GGUF, not its prompt


@pytest.fixture(scope="module")
def keyed_app(settings: Settings) -> Flask:
    return create_app(settings.model_copy(update={"require_api_key": True}))


@pytest.fixture(scope="module")
def keys(keyed_app: Flask, settings: Settings) -> dict[str, dict[str, str]]:
    """Bearer headers: an admin key, a user key without limits, and R, limited to smollm2*."""
    store = KeyStore(settings.model_copy(update={"require_api_key": True}))
    made = {
        "admin": store.create("hostile-admin", admin=True)[0],
        "user": store.create("hostile-user")[0],
        "r": store.create("hostile-r", limits=KeyLimits(models=["smollm2*"]))[0],
    }
    return {name: {"Authorization": f"Bearer {key}"} for name, key in made.items()}


@pytest.fixture(scope="module")
def house(keyed_app: Flask, keys: dict[str, dict[str, str]], settings: Settings) -> Iterator[str]:
    """The digest of the SYSTEM layer of a model R may not use (made by the admin, removed afterwards)."""
    client = keyed_app.test_client()
    r = client.post("/api/create", headers=keys["admin"], json={"model": HOUSE, "from": MODEL, "system": SECRET,
                                                                  "stream": False})
    assert r.status_code == 200, r.get_data(as_text=True)
    manifest = ModelStore(settings.models_path).manifest(HOUSE)
    layer = next(x for x in manifest["layers"] if x["mediaType"].endswith(".system"))
    assert layer["digest"] == "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
    try:
        yield str(layer["digest"])
    finally:
        client.delete("/api/delete", headers=keys["admin"], json={"model": HOUSE})


@pytest.fixture()
def keyed(keyed_app: Flask) -> FlaskClient:
    return keyed_app.test_client()


def digests(settings: Settings, name: str) -> dict[str, str]:
    manifest = ModelStore(settings.models_path).manifest(name)
    return {"config": manifest["config"]["digest"], "model": manifest["layers"][0]["digest"]}


def refused(name: str) -> dict[str, str]:
    return {"error": f"model '{name}' is not allowed for the key 'hostile-r'"}


def test_limited_key_cannot_read_foreign_manifest(keyed: FlaskClient, keys: dict[str, dict[str, str]]) -> None:
    shown = keyed.post("/api/show", headers=keys["r"], json={"model": EMBED_MODEL})
    r = keyed.get(f"/api/manifests/{EMBED_MODEL}", headers=keys["r"])
    assert (r.status_code, r.get_json()) == (shown.status_code, shown.get_json()) == (403, refused(EMBED_MODEL))
    assert keyed.get(f"/api/manifests/{MODEL}", headers=keys["r"]).status_code == 200
    assert keyed.get(f"/api/manifests/{EMBED_MODEL}", headers=keys["admin"]).status_code == 200
    assert keyed.get(f"/api/manifests/{EMBED_MODEL}", headers=keys["user"]).status_code == 200


def test_limited_key_cannot_read_foreign_blob(keyed: FlaskClient, keys: dict[str, dict[str, str]],
                                              settings: Settings) -> None:
    for digest in digests(settings, EMBED_MODEL).values():  # the 46 MB GGUF and its config
        r = keyed.get(f"/api/blobs/{digest}", headers=keys["r"])
        assert r.status_code == 403
        assert r.get_json() == {"error": f"blob '{digest}' is not allowed for the key 'hostile-r': "
                                         "no model the key may use has it"}
        assert keyed.head(f"/api/blobs/{digest}", headers=keys["r"]).status_code == 403
        assert keyed.head(f"/api/blobs/{digest}", headers=keys["admin"]).status_code == 200
        assert keyed.head(f"/api/blobs/{digest}", headers=keys["user"]).status_code == 200
    for digest in digests(settings, MODEL).values():  # its own model's blobs it reads
        assert keyed.head(f"/api/blobs/{digest}", headers=keys["r"]).status_code == 200
    config = digests(settings, MODEL)["config"]
    r = keyed.get(f"/api/blobs/{config}", headers=keys["r"])
    assert r.status_code == 200 and hashlib.sha256(r.data).hexdigest() == config.split(":")[1]


def test_limited_key_cannot_read_foreign_system_prompt(keyed: FlaskClient, keys: dict[str, dict[str, str]],
                                                       house: str, settings: Settings) -> None:
    r = keyed.get(f"/api/blobs/{house}", headers=keys["r"])
    assert r.status_code == 403 and SECRET not in r.get_data(as_text=True)
    assert keyed.post("/api/show", headers=keys["r"], json={"model": HOUSE}).status_code == 403
    # The GGUF the house bot shares with smollm2 stays readable: R may use smollm2.
    assert keyed.head(f"/api/blobs/{digests(settings, HOUSE)['model']}", headers=keys["r"]).status_code == 200
    for allowed in ("admin", "user"):  # the user key may use every model, the house bot included
        assert keyed.get(f"/api/blobs/{house}", headers=keys[allowed]).get_data(as_text=True) == SECRET
    open_server = create_app(settings).test_client()  # no keys: as before
    assert open_server.get(f"/api/blobs/{house}").get_data(as_text=True) == SECRET


def test_blob_answers_do_not_tell_a_limited_key_which_digests_exist(
    keyed: FlaskClient, keys: dict[str, dict[str, str]], house: str
) -> None:
    """A guessed prompt's digest must not be confirmable: present-but-foreign and absent look alike."""
    absent = "sha256:" + hashlib.sha256(b"a guess at the house prompt").hexdigest()
    assert keyed.head(f"/api/blobs/{house}", headers=keys["r"]).status_code == 403
    assert keyed.head(f"/api/blobs/{absent}", headers=keys["r"]).status_code == 403
    assert keyed.head(f"/api/blobs/{absent}", headers=keys["admin"]).status_code == 404
    assert keyed.get("/api/blobs/not-a-digest", headers=keys["r"]).status_code == 400


def test_user_key_cannot_read_a_blob_no_model_uses(keyed: FlaskClient, keys: dict[str, dict[str, str]],
                                                   settings: Settings) -> None:
    data = b"uploaded for a create that has not happened yet"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert keyed.post(f"/api/blobs/{digest}", headers=keys["admin"], data=data).status_code == 201
    try:
        assert keyed.head(f"/api/blobs/{digest}", headers=keys["user"]).status_code == 403
        assert keyed.get(f"/api/blobs/{digest}", headers=keys["user"]).status_code == 403
        assert keyed.get(f"/api/blobs/{digest}", headers=keys["admin"]).data == data
    finally:
        ModelStore(settings.models_path).blob_path(digest).unlink(missing_ok=True)


def test_limited_key_gets_one_answer_for_every_spelling_of_a_model(keyed: FlaskClient,
                                                                   keys: dict[str, dict[str, str]]) -> None:
    for spelling in ("smollm2", "SmolLM2", " smollm2\t", "smollm2:LATEST", "registry.ollama.ai/library/smollm2"):
        r = keyed.post("/api/show", headers=keys["r"], json={"model": spelling})
        assert r.status_code == 200, (spelling, r.get_json())
        assert keyed.get(f"/api/manifests/{spelling.strip()}", headers=keys["r"]).status_code == 200
    for spelling in ("all-minilm", "ALL-MINILM", " all-minilm ", "library/all-minilm:latest"):
        assert keyed.post("/api/show", headers=keys["r"], json={"model": spelling}).status_code == 403, spelling
        assert keyed.get(f"/api/manifests/{spelling.strip()}", headers=keys["r"]).status_code == 403, spelling
        if "/" not in spelling:  # /v1/models/{id} takes no slashes
            assert keyed.get(f"/v1/models/{spelling.strip()}", headers=keys["r"]).status_code == 403, spelling


def test_every_route_that_reads_a_model_refuses_a_foreign_one(keyed: FlaskClient, keys: dict[str, dict[str, str]],
                                                              house: str) -> None:
    """The sweep: each answers 403 before anything runs (this tier has no Redis and no worker)."""
    chat = [{"role": "user", "content": "hi"}]
    calls = [
        ("POST", "/api/show", {"model": EMBED_MODEL}),
        ("GET", f"/api/manifests/{EMBED_MODEL}", None),
        ("GET", f"/v1/models/{EMBED_MODEL}", None),
        ("POST", "/api/embed", {"model": EMBED_MODEL, "input": ["x"]}),
        ("POST", "/api/embeddings", {"model": EMBED_MODEL, "prompt": "x"}),
        ("POST", "/v1/embeddings", {"model": EMBED_MODEL, "input": "x"}),
        ("POST", "/api/generate", {"model": HOUSE, "prompt": "x"}),
        ("POST", "/api/chat", {"model": HOUSE, "messages": chat}),
        ("POST", "/v1/chat/completions", {"model": HOUSE, "messages": chat}),
        ("POST", "/v1/completions", {"model": HOUSE, "prompt": "x"}),
        ("POST", "/api/jobs", {"kind": "embed", "model": EMBED_MODEL, "items": [{"input": "x"}]}),
        ("POST", "/api/jobs", {"kind": "chat", "model": HOUSE, "items": [{"messages": chat}]}),
    ]
    for method, path, body in calls:
        r = keyed.open(path, method=method, headers=keys["r"], json=body)
        assert r.status_code == 403, (path, r.get_json())
    listed = keyed.get("/api/tags", headers=keys["r"]).get_json()["models"]
    assert listed and all(m["name"].startswith("smollm2") for m in listed)
    assert all(m["id"].startswith("smollm2") for m in keyed.get("/v1/models", headers=keys["r"]).get_json()["data"])


def test_a_remote_worker_with_a_limited_key_copies_its_models_only(keyed_app: Flask, settings: Settings,
                                                                   tmp_path: Path) -> None:
    """``corral worker --pull-from`` sends the worker's CORRAL_API_KEY: limited to the embedding model, it copies
    that model (listing, manifests, blobs) and is refused the others."""
    key = KeyStore(settings).create("hostile-worker", limits=KeyLimits(models=["all-minilm*"]))[0]
    target = ModelStore(tmp_path / "models")
    with httpx.Client(transport=httpx.WSGITransport(app=keyed_app), base_url="http://localhost",
                      headers={"Authorization": f"Bearer {key}"}) as client:
        copied = pull_from_server(target, "http://localhost", None, client=client)
        assert copied and all(name.startswith("all-minilm") for name in copied)
        assert target.get(EMBED_MODEL).model_digest == ModelStore(settings.models_path).get(EMBED_MODEL).model_digest
        with pytest.raises(CorralError, match="403"):
            pull_from_server(target, "http://localhost", [MODEL], client=client)
    assert {r.name.model for r in target.list()} == {"all-minilm"}
