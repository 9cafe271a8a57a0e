"""``POST /api/jobs?dry_run=true`` and ``corral submit --dry-run``: every line validated and counted with the
model's tokenizer, duplicates found, the output bounded, an ETA from the workers' measured rate; nothing
stored or queued."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.helpers import EMBED_MODEL, MODEL, cli, job_count, results, settled_counts, submit, wait_done, write_jsonl

ITEMS = [
    {"custom_id": "a", "prompt": "Write a haiku about rain.", "options": {"num_predict": 24, "temperature": 0}},
    {"custom_id": "b", "prompt": "Write a haiku about rain.", "options": {"num_predict": 24, "temperature": 0}},
    {"custom_id": "c", "system": "You are terse.", "prompt": "List three rivers.", "options": {"num_predict": 40}},
]


def test_a_dry_run_counts_what_the_run_will_do_and_stores_nothing(base_url: str, tmp_path: Path) -> None:
    jobs_before = job_count(base_url)
    r = httpx.post(f"{base_url}/api/jobs", params={"dry_run": "true"}, timeout=120,
                   json={"model": MODEL, "kind": "generate", "items": ITEMS})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["items"] == 3 and answer["duplicates"] == 1 and answer["output_token_bound"] == 24 + 40
    assert job_count(base_url) == jobs_before  # nothing stored

    # The real run decodes exactly the counted prompt tokens (the duplicate is not run).
    job = submit(base_url, kind="generate", items=ITEMS)
    assert wait_done(base_url, job["id"])["status"] == "completed"
    lines = results(base_url, job["id"])
    assert answer["prompt_tokens"] == lines[0]["response"]["prompt_eval_count"] + lines[2]["response"]["prompt_eval_count"]

    # With the worker's rate measured (the run above generated for it), the ETA is the bound at that rate.
    settled_counts(base_url)
    source = write_jsonl(tmp_path / "items.jsonl", ITEMS)
    result = cli(base_url, "submit", str(source), "-m", MODEL, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    again = json.loads(result.output)
    assert again["prompt_tokens"] == answer["prompt_tokens"] and job_count(base_url) == jobs_before + 1
    assert again["eta"]["tokens_per_second"] > 0
    assert again["eta_seconds"] == round(again["output_token_bound"] / again["eta"]["tokens_per_second"], 1)
    shown = cli(base_url, "submit", str(source), "-m", MODEL, "--dry-run")
    assert "prompt tokens" in shown.output and "ETA" in shown.output


def test_a_dry_run_refuses_what_a_submission_refuses(base_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": 7}) + "\n")
    r = httpx.post(f"{base_url}/api/jobs", params={"dry_run": "true", "model": MODEL, "kind": "generate"},
                   content=bad.read_bytes(), headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 400 and "line 2" in r.json()["error"]


def test_an_embedding_dry_run_counts_tokens_and_says_why_there_is_no_eta(base_url: str) -> None:
    r = httpx.post(f"{base_url}/api/jobs?dry_run=1", timeout=120,
                   json={"model": EMBED_MODEL, "kind": "embed", "items": [{"input": "one two three"}, {"input": ["a", "b"]}]})
    answer = r.json()
    assert r.status_code == 200 and answer["items"] == 2 and answer["prompt_tokens"] >= 7
    assert answer["eta_seconds"] is None and "embedding" in answer["eta"]["reason"]
