"""The red-team list's cases that need real processes (issue #33 items 1 and 6): grammar bombs that crashed the
worker, and a chat long enough to hold it for minutes.  The API-tier cases are in tests/api/test_hostile.py."""

from __future__ import annotations

import httpx

from corral.broker import Broker
from corral.modelstore.store import ModelStore
from corral.settings import Settings
from harness.stack import Stack
from jobs.service import JobService
from tests.api.test_hostile import HOSTILE_FORMATS
from tests.helpers import MODEL, results, wait_done


def test_grammar_bombs_leave_the_worker_running(stack: Stack) -> None:
    """Eight ``^a{0,+20000}$``-style formats, sent as the report sent them, are 400s; the worker that was serving
    before is the one serving after (it used to die with SIGSEGV, and `corral up` gave up after six)."""
    before = set(stack.worker_names())
    for schema in HOSTILE_FORMATS:
        r = httpx.post(stack.base_url + "/api/generate", timeout=60, json={
            "model": MODEL, "prompt": "x", "format": schema, "stream": False, "options": {"num_predict": 4}})
        assert r.status_code == 400 and r.json()["error"].startswith("invalid format: ")
    ok = httpx.post(stack.base_url + "/api/generate", timeout=120, json={
        "model": MODEL, "prompt": "Say yes.", "stream": False, "format": {"type": "string", "pattern": "^(yes|no)$"},
        "options": {"num_predict": 8, "temperature": 0}})
    assert ok.status_code == 200 and ok.json()["response"] in ('"yes"', '"no"')
    assert set(stack.worker_names()) == before


def test_a_grammar_bomb_stored_past_the_api_fails_its_item_without_a_crash(settings: Settings, stack: Stack) -> None:
    """A job line stored before the API checked formats this way (or by any other path) is refused by the worker's
    own check: the item fails once with a clear error, the job's other items succeed, and the worker lives."""
    before = set(stack.worker_names())
    service = JobService(settings, ModelStore(settings.models_path), Broker(settings))
    options = {"temperature": 0, "num_predict": 4}
    job = service.submit(kind="generate", model=MODEL, chunk_size=2, items=[
        ("bomb", {"prompt": "x", "format": HOSTILE_FORMATS[0], "options": options}),
        ("fine", {"prompt": "Say hi.", "options": options})])
    done = wait_done(stack.base_url, job["id"], timeout=180)
    assert done["counts"]["failed"] == 1 and done["counts"]["succeeded"] == 1
    [bomb] = [r for r in results(stack.base_url, job["id"]) if r["custom_id"] == "bomb"]
    assert "invalid format: a repetition bound of 20000" in str(bomb.get("error"))
    assert set(stack.worker_names()) == before


def test_a_chat_of_thousands_of_tiny_messages_is_fitted_quickly(stack: Stack) -> None:
    """2,000 tiny messages at num_ctx 256 took 240 s of worker time when every dropped message meant another
    render and tokenization of the whole chat; now the newest that fit are kept (as Ollama keeps them) at once.
    No assertion times it (bench/chat_truncation.py measures it: tens of milliseconds); the old fitting's 240 s
    ran past the client's timeout, which fails this test."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}: a few words"} for i in range(1999)]
    messages.append({"role": "user", "content": "Say hi."})
    r = httpx.post(stack.base_url + "/api/chat", timeout=120, json={
        "model": MODEL, "messages": messages, "stream": False,
        "options": {"num_ctx": 256, "num_predict": 2, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert 100 < r.json()["prompt_eval_count"] <= 256  # the newest messages that fit, not just the last one
