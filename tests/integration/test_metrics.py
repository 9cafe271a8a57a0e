"""GET /metrics: Prometheus text that moves with real traffic."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import MODEL, submit, wait_done


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(base_url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text) for s in family.samples
    }


def test_metrics_follow_traffic(base_url: str) -> None:
    before = scrape(base_url)
    chat_key = ("corral_http_requests_total", (("method", "POST"), ("route", "/api/chat"), ("status", "200")))
    tokens_key = ("corral_generated_tokens_total", (("model", f"{MODEL}:latest"),))  # labels: canonical names
    ttft_key = ("corral_time_to_first_token_seconds_count", (("model", f"{MODEL}:latest"),))
    reply = httpx.post(base_url + "/api/chat", timeout=120, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "Hi"}],
        "options": {"num_predict": 5, "temperature": 0},
    }).json()
    httpx.post(base_url + "/api/chat", json={"model": "no-such-model", "messages": []})
    after = scrape(base_url)
    assert after[chat_key] == before.get(chat_key, 0) + 1
    assert after[tokens_key] == before.get(tokens_key, 0) + reply["eval_count"]
    assert after[ttft_key] == before.get(ttft_key, 0) + 1
    assert after[("corral_http_requests_total", (("method", "POST"), ("route", "/api/chat"), ("status", "404")))] >= 1
    assert after[("corral_workers", ())] == 1


def gauge(sample: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in sample.items() if n == name and labels.items() <= dict(ls).items())


def test_job_gauges_count_a_job_while_it_runs_and_after(base_url: str) -> None:
    before = scrape(base_url)
    job = submit(base_url, kind="generate", chunk_size=1, options={"num_predict": 30},
                 items=[{"prompt": f"Tell a story about the number {i}."} for i in range(8)])
    during = scrape(base_url)
    # every item of the new job is counted in some state, and its 8 one-item chunks cannot all be done yet
    # (a worker runs at most two chunks at a time, each generating 30 tokens)
    assert gauge(during, "corral_job_items") == gauge(before, "corral_job_items") + 8
    assert gauge(during, "corral_queue_depth", **{"class": "batch"}) >= 1
    assert gauge(during, "corral_job_items", state="pending") + gauge(during, "corral_job_items", state="running") >= 1
    assert wait_done(base_url, job["id"])["counts"]["succeeded"] == 8
    after = scrape(base_url)
    assert gauge(after, "corral_job_items", state="succeeded") >= gauge(before, "corral_job_items", state="succeeded") + 8
    assert gauge(after, "corral_queue_depth", **{"class": "batch"}) == 0
    assert gauge(after, "corral_queue_depth", **{"class": "interactive", "state": "waiting"}) == 0
