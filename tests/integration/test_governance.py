"""Per-key limits on a shared server, against real processes: two API servers in front of the session's worker,
Redis and database share every limit; a spent limit is a 429 with a correct Retry-After, which the openai
client waits out by itself; a token budget resets after its period; a job past the queue limit is refused whole;
a model outside the allow-list is a 403 and missing from the listings; usage adds up to the responses' counts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from corral.settings import Settings
from harness.processes import free_port
from harness.stack import Stack, settings_env
from tests.helpers import EMBED_MODEL, MODEL, ROOT

CHAT = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def apis(settings: Settings, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Stack]]:
    """Two API servers with keys required, in front of the session's worker, Redis and database."""
    servers = []
    for i in range(2):
        own = settings.model_copy(update={"require_api_key": True, "host": f"127.0.0.1:{free_port()}"})
        server = Stack(own, tmp_path_factory.mktemp(f"governed-{i}"))
        server.start_api()
        servers.append(server)
    yield servers
    for server in servers:
        server.stop()


def corral(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def key(settings: Settings, name: str, *limits: str) -> dict[str, str]:
    done = corral(settings, "keys", "create", name, *limits)
    assert done.returncode == 0, done.stderr
    return {"Authorization": f"Bearer {done.stdout.strip()}"}


def embed(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url + "/api/embed", headers=headers, json={"model": EMBED_MODEL, "input": ["hello"]}, timeout=60)


def test_two_api_processes_share_one_rpm_limit(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "three-a-minute", "--rpm", "3")
    answers = [embed(apis[i % 2].base_url, headers) for i in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    refused = answers[-1]
    assert refused.json() == {"error": "rate limit reached: 3 requests per minute for the key 'three-a-minute'"}
    assert 50 <= int(refused.headers["Retry-After"]) <= 60  # when the first of the three leaves the window
    r = httpx.post(apis[1].base_url + "/v1/embeddings", headers=headers, json={"model": EMBED_MODEL, "input": "x"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in r.headers


def test_a_token_budget_resets_after_its_period_and_the_openai_client_waits(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "small-budget", "--token-budget", "5", "--budget-period", "4s")
    body = {"model": MODEL, "messages": CHAT, "stream": False, "options": {"num_predict": 3}}
    assert httpx.post(apis[0].base_url + "/api/chat", headers=headers, json=body, timeout=60).status_code == 200
    spent = httpx.post(apis[1].base_url + "/api/chat", headers=headers, json=body, timeout=60)
    assert spent.status_code == 429 and "budget" in spent.json()["error"]
    assert 1 <= int(spent.headers["Retry-After"]) <= 4
    client = openai.OpenAI(base_url=apis[0].base_url + "/v1", api_key=headers["Authorization"][7:], max_retries=3)
    started = time.monotonic()
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].message.content is not None
    assert time.monotonic() - started >= 0.5  # it waited out the 429 by itself, then the budget had reset


def test_a_job_past_the_queue_limit_is_refused_whole(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "few-items", "--max-queued-items", "3")
    url = apis[0].base_url
    job = {"kind": "generate", "model": MODEL, "options": {"num_predict": 1}, "items": [{"prompt": f"{i}"} for i in range(5)]}
    r = httpx.post(url + "/api/jobs", headers=headers, json=job)
    assert r.status_code == 429 and r.json()["error"].startswith("the key 'few-items' may have at most 3 queued batch items")
    assert httpx.get(url + "/api/jobs", headers=headers).json()["jobs"] == []  # nothing stored
    assert httpx.post(url + "/api/jobs", headers=headers, json={**job, "items": job["items"][:2]}).status_code == 202
    updated = corral(settings, "keys", "update", "few-items", "--max-queued-items", "10")
    assert updated.returncode == 0 and "max_queued_items=10" in updated.stdout
    time.sleep(5.5)  # API processes cache a key's limits for 5 s
    assert httpx.post(url + "/api/jobs", headers=headers, json=job).status_code == 202


def test_the_model_allow_list(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "embedder", "--models", "all-minilm*")
    url = apis[1].base_url
    r = httpx.post(url + "/api/chat", headers=headers, json={"model": MODEL, "messages": CHAT})
    assert (r.status_code, r.json()) == (403, {"error": f"model '{MODEL}' is not allowed for the key 'embedder'"})
    assert embed(url, headers).status_code == 200
    listed = {m["name"] for m in httpx.get(url + "/api/tags", headers=headers).json()["models"]}
    assert "all-minilm:latest" in listed and all(name.startswith("all-minilm:") for name in listed)
    assert {m["id"] for m in httpx.get(url + "/v1/models", headers=headers).json()["data"]} == listed
    job = {"kind": "chat", "model": MODEL, "items": [{"messages": CHAT}]}
    assert httpx.post(url + "/api/jobs", headers=headers, json=job).status_code == 403


def test_open_requests_are_limited(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "one-at-a-time", "--max-concurrent", "1")
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "raw": True, "options": {"num_predict": 2000, "temperature": 0}}
    with httpx.stream("POST", apis[0].base_url + "/api/generate", headers=headers, json=body, timeout=60) as first:
        lines = first.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # the stream is open
        second = embed(apis[1].base_url, headers)
        assert second.status_code == 429 and second.json()["error"].endswith("1 open requests for the key 'one-at-a-time'")
    time.sleep(0.5)  # the first stream closed (its client went away): its place is free
    assert embed(apis[1].base_url, headers).status_code == 200


def test_usage_adds_up_to_the_responses(apis: list[Stack], settings: Settings) -> None:
    headers = key(settings, "counted")
    replies = [httpx.post(apis[i].base_url + "/api/chat", headers=headers, timeout=60, json={
        "model": MODEL, "messages": CHAT, "stream": False, "options": {"num_predict": 2 + i}}).json() for i in range(2)]
    embedded = embed(apis[0].base_url, headers).json()
    time.sleep(1.5)  # each API process writes its counts to SQL once a second
    rows = httpx.get(apis[0].base_url + "/api/usage", headers=headers).json()["usage"]
    assert len(rows) == 1 and rows[0]["key"] == "counted"
    today = rows[0]
    assert today["requests"] == 3 and today["embed_inputs"] == 1
    assert today["generated_tokens"] == sum(r["eval_count"] for r in replies)
    assert today["prompt_tokens"] == sum(r["prompt_eval_count"] for r in replies) + embedded["prompt_eval_count"]
    shown = corral(settings, "keys", "usage", "counted", "--json")
    assert shown.returncode == 0 and '"generated_tokens": ' + str(today["generated_tokens"]) in shown.stdout
    series = 'corral_key_tokens_total{key="counted",kind="generated"}'  # per-key series: for an admin key only
    assert series in httpx.get(apis[0].base_url + "/metrics", headers=key(settings, "scraper", "--admin")).text
    assert series not in httpx.get(apis[0].base_url + "/metrics", headers=headers).text


def test_batch_items_are_counted_in_the_usage_too(apis: list[Stack], settings: Settings) -> None:
    from harness.stack import wait_for

    headers = key(settings, "batcher")
    url = apis[0].base_url
    job = httpx.post(url + "/api/jobs", headers=headers, json={
        "kind": "generate", "model": MODEL, "options": {"num_predict": 2, "temperature": 0},
        "items": [{"prompt": f"Count to {i}."} for i in range(3)]}).json()
    wait_for(lambda: httpx.get(f"{url}/api/jobs/{job['id']}", headers=headers).json()["status"] == "completed",
             120, "the job to complete")
    text = httpx.get(f"{url}/api/jobs/{job['id']}/results", headers=headers, timeout=60).text
    lines = [json.loads(line) for line in text.splitlines()]
    row = httpx.get(url + "/api/usage", headers=headers).json()["usage"][0]
    assert (row["key"], row["requests"], row["batch_items"]) == ("batcher", 0, 3)
    assert row["batch_generated_tokens"] == sum(line["response"]["eval_count"] for line in lines)
    assert row["batch_prompt_tokens"] == sum(line["response"]["prompt_eval_count"] for line in lines)
