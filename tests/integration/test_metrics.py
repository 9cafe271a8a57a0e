"""GET /metrics: Prometheus text that moves with real traffic."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import MODEL


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
    tokens_key = ("corral_generated_tokens_total", (("model", MODEL),))
    ttft_key = ("corral_time_to_first_token_seconds_count", (("model", MODEL),))
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
    assert ("corral_queue_depth", (("class", "interactive"), ("model", "smollm2:135m"), ("state", "waiting"))) in after \
        or ("corral_queue_depth", (("class", "interactive"), ("model", "smollm2:latest"), ("state", "waiting"))) in after
    assert {k[1] for k in after if k[0] == "corral_job_items"} >= {(("state", s),) for s in ("pending", "succeeded")}
