"""API keys end to end: `corral keys` in a real subprocess, an API server with keys required, the official
ollama and openai clients sending them, per-key isolation of jobs and files, revocation; body limits."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, settings_env, wait_for
from tests.helpers import MODEL, ROOT

LIMIT = 1 << 20  # CORRAL_MAX_BODY for this server: 1 MiB


@pytest.fixture(scope="module")
def keyed(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second API server in front of the session's worker and database, with keys required."""
    own = settings.model_copy(update={"require_api_key": True, "host": f"127.0.0.1:{free_port()}", "max_body": LIMIT})
    server = Stack(own, tmp_path_factory.mktemp("keyed-logs"))
    server.start_api()
    yield server
    server.stop()


def corral(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def new_key(settings: Settings, name: str, *extra: str) -> str:
    done = corral(settings, "keys", "create", name, *extra)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("corral-") and len(key) > 40 and "not shown again" in done.stderr
    return key




def test_clients_send_their_keys(keyed: Stack, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key(settings, "clients")
    monkeypatch.setenv("OLLAMA_API_KEY", key)  # ollama-python sends it as a Bearer token
    names = {m.model for m in ollama.Client(host=keyed.base_url).list().models}
    assert "smollm2:latest" in names
    oai = openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=key, max_retries=0)
    reply = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url + "/v1", api_key="nope", max_retries=0).models.list()


def test_each_key_sees_only_its_own_jobs_and_files(keyed: Stack, settings: Settings) -> None:
    alice, bob, admin = new_key(settings, "alice"), new_key(settings, "bob"), new_key(settings, "root", "--admin")
    as_ = {name: {"Authorization": f"Bearer {k}"} for name, k in (("alice", alice), ("bob", bob), ("admin", admin))}
    url = keyed.base_url
    job = httpx.post(url + "/api/jobs", headers=as_["alice"], json={
        "kind": "generate", "model": MODEL, "options": {"num_predict": 2}, "items": [{"prompt": "hi"}]}).json()
    assert httpx.get(f"{url}/api/jobs/{job['id']}", headers=as_["alice"]).status_code == 200
    for path in (f"/api/jobs/{job['id']}", f"/api/jobs/{job['id']}/results"):
        r = httpx.get(url + path, headers=as_["bob"])
        assert r.status_code == 404 and r.json() == {"error": f"job '{job['id']}' not found"}
    assert httpx.post(f"{url}/api/jobs/{job['id']}/cancel", headers=as_["bob"]).status_code == 404
    assert job["id"] not in {j["id"] for j in httpx.get(url + "/api/jobs", headers=as_["bob"]).json()["jobs"]}
    assert job["id"] in {j["id"] for j in httpx.get(url + "/api/jobs?limit=1000", headers=as_["admin"]).json()["jobs"]}
    assert httpx.get(f"{url}/api/jobs/{job['id']}", headers=as_["admin"]).status_code == 200
    # OpenAI files and batches belong to their key too
    alice_ai = openai.OpenAI(base_url=url + "/v1", api_key=alice, max_retries=0)
    bob_ai = openai.OpenAI(base_url=url + "/v1", api_key=bob, max_retries=0)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    f = alice_ai.files.create(file=("a.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        bob_ai.files.retrieve(f.id)
    batch = alice_ai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bob_ai.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob_ai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in {b.id for b in bob_ai.batches.list(limit=100).data}
    assert alice_ai.batches.retrieve(batch.id).id == batch.id


def test_revoked_key_stops_working(keyed: Stack, settings: Settings) -> None:
    key = new_key(settings, "temp")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(keyed.base_url + "/api/tags", headers=headers).status_code == 200
    listed = corral(settings, "keys", "list")
    assert listed.returncode == 0 and "temp" in listed.stdout and key[:12] in listed.stdout and key not in listed.stdout
    revoked = corral(settings, "keys", "revoke", "temp")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    wait_for(lambda: httpx.get(keyed.base_url + "/api/tags", headers=headers).status_code == 401, 15, "revocation")
    again = corral(settings, "keys", "revoke", "no-such-key")
    assert again.returncode == 1 and "no key with id or name 'no-such-key'" in again.stderr
    dup = corral(settings, "keys", "create", "alice-dup")
    assert dup.returncode == 0
    assert corral(settings, "keys", "create", "alice-dup").stderr.strip() == "Error: a key named 'alice-dup' already exists"




def test_keys_cli_needs_a_database(tmp_path: Path, settings: Settings) -> None:
    broken = settings.model_copy(update={"database_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    done = corral(broken, "keys", "list")
    assert done.returncode == 1 and done.stderr.startswith("Error: cannot open the database")
