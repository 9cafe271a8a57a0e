"""The red-team list of issue #33, as one regression file for the API tier: each test is named after what it attacks.

Sections: grammar bombs and templates; what one key can reach of models it is not allowed; dry runs; outbound
requests (webhooks and pulls).  The cases that need real processes (a crash, a stalled webhook, the time a long
chat takes, Redis keys, /api/ps) are in tests/integration/test_hostile_*.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from api import create_app
from api.gateway import Gateway
from corral.errors import CorralError
from corral.modelstore.layers import render_template
from corral.modelstore.remote import pull_from_server
from corral.modelstore.store import ModelStore
from corral.protocol import BuildRequest, StreamEvent
from corral.settings import Settings
from jobs.keys import KeyLimits, KeyStore
from tests.helpers import EMBED_MODEL, MODEL

# -- Grammar bombs and templates -------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

# Each crashed the worker with SIGSEGV (a repetition bound the old regex did not read as a number), or was a 500.
HOSTILE_FORMATS = [
    {"type": "string", "pattern": "^a{0,+20000}$"},
    {"type": "string", "pattern": "^a{0,20_000}$"},
    {"type": "string", "pattern": "^a{0, 20000 }$"},
    {"type": "string", "pattern": "^(ab){0,０２００００}$"},
    {"type": "string", "pattern": "^" + "(a" * 1500 + ")" * 1500 + "$"},
    {"type": "string", "pattern": "abc"},  # no ^...$: an AssertionError in the converter
    {"$ref": "https://example.com/schema.json"},  # a remote $ref: an AssertionError, and never fetched
    {"type": "array", "items": {"type": "string"}, "minItems": 10**12},
    {"type": "string", "pattern": "^a{-20000000,0}$"},  # max - min optional items: the review's 436 MB in 0.6 s
    {"type": "string", "minLength": -20000000, "maxLength": 0},
]


@pytest.mark.parametrize("schema", HOSTILE_FORMATS)
def test_grammar_bombs_and_unconvertible_formats_are_400s_on_every_route(client: FlaskClient, schema: dict[str, Any]) -> None:
    r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "format": schema, "options": {"num_predict": 4}})
    assert r.status_code == 400 and r.get_json()["error"].startswith("invalid format: ")
    r = client.post("/api/chat", json={**CHAT, "format": schema})
    assert r.status_code == 400 and r.get_json()["error"].startswith("invalid format: ")
    openai = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = client.post("/v1/chat/completions", json=openai)
    assert r.status_code == 400 and r.get_json()["error"]["param"] == "response_format"
    # Job submission refuses what the sync routes refuse: as JSON, and as JSONL
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "ok"}, {"prompt": "x", "format": schema}]})
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 2: invalid format: ")
    line = json.dumps({"prompt": "x", "format": schema}).encode() + b"\n"
    r = client.post(f"/api/jobs?model={MODEL}", data=line, content_type="application/x-ndjson")
    assert r.status_code == 400 and r.get_json()["error"].startswith("line 1: invalid format: ")


def test_grammar_bombs_in_an_openai_batch_file_are_refused(client: FlaskClient) -> None:
    body = {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": HOSTILE_FORMATS[0]}}}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    upload = client.post("/v1/files", data={"purpose": "batch",
                                            "file": (io.BytesIO(json.dumps(line).encode() + b"\n"), "in.jsonl")})
    assert upload.status_code == 200
    r = client.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h"})
    batch = r.get_json()  # as OpenAI does: the batch is created failed, with the line's error, and nothing runs
    assert (r.status_code, batch["status"]) == (200, "failed")
    assert batch["errors"]["data"][0]["line"] == 1
    assert batch["errors"]["data"][0]["message"].startswith("invalid format: a repetition bound of 20000")


def test_a_schema_within_the_budget_still_passes(client: FlaskClient) -> None:
    """The budget refuses bombs, not ordinary schemas: the old limits (a bound of 1000) still hold."""
    from jobs.ingest import validate_item

    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{0,1000}$"}}}
    assert validate_item("generate", 1, {"prompt": "x", "format": schema})[1]["format"] == schema


def test_deeply_nested_template_is_refused_at_create_and_tags_keep_working(client: FlaskClient) -> None:
    template = "{{if .System}}" * 1200 + "{{ .Prompt }}" + "{{end}}" * 1200
    r = client.post("/api/create", json={"model": "hostile-deep", "from": MODEL, "template": template, "stream": False})
    assert r.status_code == 400 and "nested deeper than" in r.get_json()["error"]
    assert client.get("/api/tags").status_code == 200
    assert "hostile-deep:latest" not in [m["name"] for m in client.get("/api/tags").get_json()["models"]]


def test_printf_with_a_python_format_width_builds_no_large_prompt(client: FlaskClient, settings: Settings) -> None:
    """``printf`` is Go's: ``{:>5000000}`` is text to it, so the prompt stays small (Python's format made it 5 MB)."""
    template = '{{ printf "{:>5000000}" .Prompt }}{{ range .Messages }}{{ .Content }}{{ end }}'
    r = client.post("/api/create", json={"model": "hostile-printf", "from": MODEL, "template": template, "stream": False})
    assert r.status_code == 200
    record = ModelStore(settings.models_path).get("hostile-printf")
    _, fields = render_template(record, "chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert fields["prompt"] == "{:>5000000}%!(EXTRA string=)hi"
    client.delete("/api/delete", json={"model": "hostile-printf"})


# -- The model allow-list --------------------------------------------------------------------------------
# What one key can reach of the models it is not allowed (issue #33), on the in-process app with keys required.
#
# Key R may use ``smollm2*`` only.  It must not read another model by any door: its manifest, its blobs by digest
# (the GGUF, the config, a SYSTEM layer that may hold a house prompt's secrets), and must get one answer for every
# spelling of a model.  A key may read a blob only when a model it may use names it; an admin key reads any, and a
# server without keys (and a remote worker pulling from it) works as before.  What needs Redis or a worker
# (/api/ps, /api/queue, /metrics, console sessions) is in tests/integration/test_hostile_access.py.

HOUSE_SECRET = "You are the house bot. The vault code is 4711; never say it."
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
    r = client.post("/api/create", headers=keys["admin"], json={"model": HOUSE, "from": MODEL, "system": HOUSE_SECRET,
                                                                  "stream": False})
    assert r.status_code == 200, r.get_data(as_text=True)
    manifest = ModelStore(settings.models_path).manifest(HOUSE)
    layer = next(x for x in manifest["layers"] if x["mediaType"].endswith(".system"))
    assert layer["digest"] == "sha256:" + hashlib.sha256(HOUSE_SECRET.encode()).hexdigest()
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
    assert r.status_code == 403 and HOUSE_SECRET not in r.get_data(as_text=True)
    assert keyed.post("/api/show", headers=keys["r"], json={"model": HOUSE}).status_code == 403
    # The GGUF the house bot shares with smollm2 stays readable: R may use smollm2.
    assert keyed.head(f"/api/blobs/{digests(settings, HOUSE)['model']}", headers=keys["r"]).status_code == 200
    for allowed in ("admin", "user"):  # the user key may use every model, the house bot included
        assert keyed.get(f"/api/blobs/{house}", headers=keys[allowed]).get_data(as_text=True) == HOUSE_SECRET
    open_server = create_app(settings).test_client()  # no keys: as before
    assert open_server.get(f"/api/blobs/{house}").get_data(as_text=True) == HOUSE_SECRET


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


# -- Dry runs and the result cache -----------------------------------------------------------------------
# Jobs used against the server, on the in-process app (issue #33): a dry run is bounded in lines, in the
# prompt tokens a worker counts for it and in what it puts in Redis at once, and it is one of the key's requests.
# The worker is faked at the gateway's edge (its build stream), so what would travel through Redis is what the
# test measures.  The same attacks against real workers and Redis: tests/integration/test_hostile_jobs.py.

TOKENS_PER_ITEM = 10
MESSAGE_BYTES = (256 << 10) + 4096  # the items of one count message (README: about 256 KiB), and its envelope


@dataclass
class FakeWorker:
    """Answers the gateway's count messages: :data:`TOKENS_PER_ITEM` tokens an item; keeps each message's size
    as Celery would carry it (the payload's JSON)."""

    messages: list[int] = field(default_factory=list)
    items: int = 0

    def build(self, req: BuildRequest) -> Iterator[StreamEvent]:
        assert req.op == "count"
        self.messages.append(len(json.dumps(req.model_dump())))
        self.items += len(req.items)
        yield StreamEvent("result", {"counts": [TOKENS_PER_ITEM] * len(req.items)})


@pytest.fixture()
def worker(monkeypatch: pytest.MonkeyPatch) -> FakeWorker:
    fake = FakeWorker()
    monkeypatch.setattr(Gateway, "_build", fake.build)
    monkeypatch.setattr(Gateway, "worker_states", lambda gateway: [])  # no throughput measured: no ETA
    return fake


def app_with(settings: Settings, **overrides: Any) -> FlaskClient:
    return create_app(settings.model_copy(update=overrides)).test_client()


def jsonl(n: int, prompt: str = "p") -> bytes:
    return "".join(json.dumps({"prompt": f"{prompt} {i}"}) + "\n" for i in range(n)).encode()


def dry_run(client: FlaskClient, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return client.post(f"/api/jobs?dry_run=true&model={MODEL}", data=body, content_type="application/x-ndjson",
                       headers=headers or {})


def test_dry_run_over_line_cap_is_413(settings: Settings, worker: FakeWorker) -> None:
    client = app_with(settings, dry_run_max_lines=3)
    r = dry_run(client, jsonl(5))
    assert r.status_code == 413
    assert r.get_json() == {"error": "a dry run reads at most 3 lines (CORRAL_DRY_RUN_MAX_LINES): dry-run a sample "
                                     "of the job, such as its first 3 lines"}
    assert worker.items == 0  # refused before a worker counted anything
    r = dry_run(client, jsonl(3))  # at the cap: answered
    assert r.status_code == 200 and r.get_json()["items"] == 3


def test_dry_run_over_token_cap_is_413(settings: Settings, worker: FakeWorker) -> None:
    client = app_with(settings, dry_run_max_tokens=25)
    r = dry_run(client, jsonl(5))  # 50 tokens
    assert r.status_code == 413
    assert r.get_json() == {"error": "a dry run counts at most 25 prompt tokens (CORRAL_DRY_RUN_MAX_TOKENS): 50 "
                                     "were counted by line 5; dry-run a sample of the job"}
    r = dry_run(client, jsonl(2))
    assert r.status_code == 200 and r.get_json()["prompt_tokens"] == 20


def test_dry_run_never_puts_a_whole_upload_in_one_redis_message(settings: Settings, worker: FakeWorker) -> None:
    # 24 lines of 100 KB: 2.4 MB, which went to the worker as one message (the 30 MB upload made Redis
    # grow by 85 MB); the route waits for each batch's count before it sends the next, so Redis holds one.
    r = dry_run(app_with(settings), jsonl(24, "x" * 100_000))
    assert r.status_code == 200 and r.get_json()["items"] == 24 and r.get_json()["prompt_tokens"] == 240
    assert worker.items == 24 and len(worker.messages) > 1
    assert max(worker.messages) <= MESSAGE_BYTES, worker.messages


def test_dry_run_counts_as_a_request_in_the_keys_usage(settings: Settings, worker: FakeWorker) -> None:
    keyed = settings.model_copy(update={"require_api_key": True})
    client = create_app(keyed).test_client()
    key, row = KeyStore(keyed).create("dry-runner")
    headers = {"Authorization": f"Bearer {key}"}
    assert dry_run(client, jsonl(3), headers).status_code == 200
    assert dry_run(client, jsonl(2), headers).status_code == 200
    usage = client.get("/api/usage", headers=headers).get_json()["usage"]
    assert [(u["key"], u["requests"], u["prompt_tokens"]) for u in usage] == [("dry-runner", 2, 0)]


# -- Outbound requests: webhooks and pulls ---------------------------------------------------------------
# URLs chosen by a client or an upstream server, used against the server's own network (issue #33, items 4, 2
# and 7), on the in-process app: a ``webhook_url`` that injects headers, spells 127.0.0.1 oddly, carries
# credentials or points at loopback, link-local or private addresses is a 400 at submission; a pull registry that
# redirects to a host ``CORRAL_PULL_HOSTS`` does not allow, or to a private address, is not followed; an upstream
# error body never reaches the error message.

INTERNAL_SECRET = "internal-secret-7f3a"  # what an internal service answers; must never show in an error


class Canned:
    """An HTTP server on 127.0.0.1 answering each path with a fixed (status, headers, body); it records every
    path it is asked for."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.asked: list[str] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                canned.asked.append(self.path)
                status, headers, body = canned.routes.get(self.path, (404, {}, b"{}"))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def registry() -> Iterator[Canned]:
    served = Canned()
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture()
def internal() -> Iterator[Canned]:
    """A service on the server's own network that answers anyone who asks (a Redis, a metadata endpoint)."""
    served = Canned()
    served.routes["/internal"] = (401, {}, INTERNAL_SECRET.encode())
    yield served
    served.server.shutdown()
    served.server.server_close()


def job_count(client: FlaskClient) -> int:
    return len(client.get("/api/jobs", query_string={"limit": 1000}).get_json()["jobs"])


# -- webhook_url at submission ---------------------------------------------------------------------------------

HOSTILE_URLS = [
    ("http://127.0.0.1:18081/a\r\nX-Injected: 1\r\n", "whitespace"),  # header injection (httpx: InvalidURL)
    ("http://127.0.0.1:18081/a b", "whitespace"),
    ("http://2130706433:18081/", "unusual form"),  # 127.0.0.1 as one integer
    ("http://0x7f.0.0.1:18081/", "unusual form"),
    ("http://0177.0.0.1:18081/", "unusual form"),
    ("http://127.1:18081/", "unusual form"),
    ("http://user:pass@example.com/", "user name or password"),
    ("http://example.com@127.0.0.1:18081/", "user name or password"),
    ("ftp://example.com/", "http or https"),
    ("http:///nohost", "no valid host"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://169.254.169.254/latest/meta-data/", "public address"),  # the cloud metadata service
    ("http://10.0.0.1:6379/", "public address"),
    ("http://192.168.1.1/", "public address"),
    ("http://172.16.0.1/", "public address"),
    ("http://100.64.0.1/", "public address"),  # carrier-grade NAT
    ("http://0.0.0.0:18081/", "public address"),
    ("http://224.0.0.1/", "public address"),  # multicast
    ("http://240.0.0.1/", "public address"),  # reserved
    ("http://[::1]:18081/", "public address"),  # IPv6 loopback, outside the tests' 127.0.0.0/8 allowance
    ("http://[fd00::1]/", "public address"),
    ("http://[::ffff:a9fe:a9fe]/", "public address"),  # 169.254.169.254 inside IPv6
]


@pytest.mark.parametrize(("url", "why"), HOSTILE_URLS)
def test_hostile_webhook_urls_are_refused_at_submission(client: FlaskClient, url: str, why: str) -> None:
    before = job_count(client)
    r = client.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], "webhook_url": url})
    assert r.status_code == 400, r.get_data(as_text=True)
    message = r.get_json()["error"]
    assert message.startswith("webhook_url") and why in message, message
    assert "\r" not in message and "\n" not in message
    assert job_count(client) == before


def test_loopback_webhooks_are_refused_unless_the_allow_setting_opens_them(settings: Settings) -> None:
    closed = app_with(settings, webhook_allow_networks=[])
    for url in ("http://127.0.0.1:18081/hook", "http://localhost:18081/hook", "http://[::ffff:127.0.0.1]:18081/"):
        r = closed.post("/api/jobs", json={"model": MODEL, "items": [{"prompt": "x"}], "webhook_url": url})
        assert r.status_code == 400 and "CORRAL_WEBHOOK_ALLOW_NETWORKS" in r.get_json()["error"], (url, r.get_json())
    # The OpenAI shape names the param.
    upload = closed.post("/v1/files", data={"purpose": "batch", "file": (_batch_line(), "in.jsonl")})
    assert upload.status_code == 200, upload.get_data(as_text=True)
    r = closed.post("/v1/batches", json={"input_file_id": upload.get_json()["id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "webhook_url": "http://localhost:18081/hook"})
    assert r.status_code == 400, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["param"] == "webhook_url" and error["type"] == "invalid_request_error"


def _batch_line() -> Any:
    import io

    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    return io.BytesIO(json.dumps(line).encode())


# -- pull ------------------------------------------------------------------------------------------------------

def pull_error(client: FlaskClient, name: str) -> str:
    r = client.post("/api/pull", json={"model": name, "insecure": True, "stream": False})
    assert r.status_code != 200, r.get_data(as_text=True)
    return str(r.get_json()["error"])


def test_a_registry_redirect_to_a_host_outside_pull_hosts_is_not_followed(
    settings: Settings, registry: Canned, internal: Canned
) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (
        302, {"Location": f"http://localhost:{internal.port}/internal"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert error == (f"pull model manifest: the registry redirected to localhost:{internal.port}, which "
                     "CORRAL_PULL_HOSTS does not allow")
    assert internal.asked == []  # never asked, so nothing of its answer could be read back


def test_a_wildcard_pull_host_does_not_reach_private_addresses_through_a_redirect(
    settings: Settings, registry: Canned, internal: Canned
) -> None:
    """``*`` allows every host name, but only on public addresses: a redirect to a name that resolves to
    loopback is refused at connect time (127.0.0.1, named exactly, stays reachable)."""
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}", "*"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (
        307, {"Location": f"http://localhost:{internal.port}/internal"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert error.startswith("pull failed: localhost resolves to an address this server does not reach"), error
    assert internal.asked == [] and INTERNAL_SECRET not in error


def test_a_blob_redirect_to_an_odd_spelling_of_loopback_is_refused(settings: Settings, registry: Canned) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}", "*"])
    manifest = {"schemaVersion": 2, "config": {"digest": "sha256:" + "0" * 64, "size": 2},
                "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "1" * 64,
                            "size": 2}]}
    registry.routes["/v2/library/tiny/manifests/latest"] = (200, {}, json.dumps(manifest).encode())
    registry.routes[f"/v2/library/tiny/blobs/sha256:{'0' * 64}"] = (
        302, {"Location": f"http://2130706433:{registry.port}/elsewhere"}, b"")
    error = pull_error(client, f"127.0.0.1:{registry.port}/library/tiny")
    assert "redirected to a URL that has an IPv4 address in an unusual form" in error, error
    assert "/elsewhere" not in registry.asked


def test_an_upstream_error_body_is_not_echoed_in_the_pull_error(settings: Settings, registry: Canned) -> None:
    client = app_with(settings, pull_hosts=[f"127.0.0.1:{registry.port}"])
    registry.routes["/v2/library/tiny/manifests/latest"] = (500, {}, f"-ERR {INTERNAL_SECRET}".encode())
    assert pull_error(client, f"127.0.0.1:{registry.port}/library/tiny") == "pull model manifest: 500"


# -- two workers, one due delivery -----------------------------------------------------------------------------

def test_two_workers_never_claim_the_same_due_delivery(settings: Settings) -> None:
    """Each worker's sender claims a due delivery with a conditional UPDATE before it sends it: a second worker
    that read the same row finds it claimed, and an attempt recorded late cannot overwrite a newer one."""
    import uuid

    from jobs.db import sessions
    from jobs.models import Job, JobStatus, WebhookDelivery, utcnow
    from jobs.webhooks import Sender

    job_id, delivery_id = f"job_{uuid.uuid4().hex[:24]}", f"msg_{uuid.uuid4().hex[:24]}"
    with sessions(settings)() as session:
        session.add(Job(id=job_id, kind="generate", model=MODEL, model_digest="0" * 64, status=JobStatus.COMPLETED,
                        chunk_size=1, webhook_url="http://127.0.0.1:9/hook"))
        session.flush()
        session.add(WebhookDelivery(id=delivery_id, job_id=job_id, event="job.completed", url="http://127.0.0.1:9/hook",
                                    payload={}, status="pending", attempts=0, created_at=utcnow(),
                                    next_attempt_at=utcnow().replace(year=2020)))  # due before anything else
        session.commit()
    first, second = Sender(settings), Sender(settings)
    claimed = [d for d in first.claim(1000) if d.id == delivery_id]
    assert len(claimed) == 1 and not [d for d in second.claim(1000) if d.id == delivery_id]
    first.record(claimed[0], "delivery failed: HTTP 500")
    first.record(claimed[0], None)  # the same attempt recorded twice: the second finds attempts moved on
    with sessions(settings)() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and (row.attempts, row.status, row.last_error) == (1, "pending", "delivery failed: HTTP 500")
        session.delete(row)
        session.commit()

