"""Deterministic requests run once: duplicates inside a job, and (with ``cache: true``) repeats across jobs.
What the worker generated is read from its heartbeat (``tokens_generated`` in /api/queue)."""

from __future__ import annotations

import httpx

from tests.helpers import MODEL, results, settled_counts, submit, wait_done


def item(prompt: str, **options: object) -> dict:
    return {"prompt": prompt, "options": {"num_predict": 6, **options}}


def test_identical_deterministic_items_run_once_and_each_keeps_its_line(base_url: str) -> None:
    items = [
        item("Name a colour.", temperature=0), item("Name a colour.", temperature=0), item("Name a colour.", temperature=0),
        item("Name a fruit.", temperature=0.9, seed=7), item("Name a fruit.", temperature=0.9, seed=7),
        item("Name an animal.", temperature=0.9), item("Name an animal.", temperature=0.9),  # sampled: both run
    ]
    for n, body in enumerate(items):
        body["custom_id"] = f"item-{n}"
        body["metadata"] = {"row": n}  # metadata is not part of the request
    _, before = settled_counts(base_url)
    job = submit(base_url, kind="generate", chunk_size=2, items=items)
    assert wait_done(base_url, job["id"])["status"] == "completed"
    _, after = settled_counts(base_url)
    lines = results(base_url, job["id"])
    assert [line["custom_id"] for line in lines] == [f"item-{n}" for n in range(7)]
    assert [line["metadata"] for line in lines] == [{"row": n} for n in range(7)]
    texts = [line["response"]["response"] for line in lines]
    assert texts[0] == texts[1] == texts[2] and texts[3] == texts[4]
    counts = [line["response"]["eval_count"] for line in lines]
    # The worker generated one colour, one fruit and both animals: four runs, not seven.
    assert after - before == counts[0] + counts[3] + counts[5] + counts[6], (after - before, counts)


def test_the_result_cache_serves_repeats_across_jobs_when_asked(base_url: str) -> None:
    first = submit(base_url, kind="generate", cache=True,
                   items=[item("Say one word about rivers.", temperature=0), item("Say one word about hills.", temperature=0)])
    assert wait_done(base_url, first["id"])["status"] == "completed"
    earlier = {line["response"]["response"] for line in results(base_url, first["id"])}

    _, before = settled_counts(base_url)
    second = submit(base_url, kind="generate", cache=True, items=[
        item("Say one word about rivers.", temperature=0), item("Say one word about hills.", temperature=0),
        item("Say one word about lakes.", temperature=0),
    ])
    assert wait_done(base_url, second["id"])["status"] == "completed"
    _, after = settled_counts(base_url)
    lines = results(base_url, second["id"])
    assert [line.get("cached", False) for line in lines] == [True, True, False]
    assert {line["response"]["response"] for line in lines[:2]} == earlier
    assert after - before == lines[2]["response"]["eval_count"]  # only the new one ran

    # Without cache: true the same requests run again, and a job of cached items only completes at once.
    plain = submit(base_url, kind="generate", items=[item("Say one word about rivers.", temperature=0)])
    assert wait_done(base_url, plain["id"])["status"] == "completed"
    assert "cached" not in results(base_url, plain["id"])[0]
    r = httpx.post(f"{base_url}/api/jobs", json={"model": MODEL, "kind": "generate", "cache": True,
                                                 "items": [item("Say one word about hills.", temperature=0)]})
    assert r.status_code == 202 and r.json()["status"] == "completed" and r.json()["counts"]["succeeded"] == 1
