"""The official ``openai`` client against the live server: /v1 chat, completions, embeddings, models, errors,
and the Files + Batches API round trip (a batch is a corral job underneath)."""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from sqlalchemy import update

from corral.settings import Settings
from harness.stack import wait_for
from jobs.db import sessions
from jobs.models import Job, utcnow
from tests.helpers import MODEL

MINILM = "all-minilm"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 12}


@pytest.fixture(scope="module")
def oai(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def native_chat(base_url: str, content: str, num_predict: int = 12) -> dict:
    r = httpx.post(base_url + "/api/chat", timeout=120, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": content}],
        "options": {"temperature": 0, "seed": 7, "top_p": 1.0, "num_predict": num_predict},
    })
    assert r.status_code == 200, r.text
    return r.json()


def test_models_list_and_retrieve(oai: OpenAI) -> None:
    ids = {m.id: m for m in oai.models.list()}
    assert {"smollm2:latest", "smollm2:135m", "all-minilm:l6-v2"} <= set(ids)
    assert ids["smollm2:latest"].owned_by == "library" and ids["smollm2:latest"].object == "model"
    assert oai.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("no-such-model")
    assert err.value.body["message"] == "model 'no-such-model:latest' not found"  # type: ignore[index]


def test_chat_completion_matches_native_chat(oai: OpenAI, base_url: str) -> None:
    prompt = "Name three colours."
    reply = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **GREEDY)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.system_fingerprint == "fp_ollama" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    native = native_chat(base_url, prompt)
    assert choice.message.content == native["message"]["content"]
    assert choice.finish_reason == ("length" if native["done_reason"] == "length" else "stop")
    assert reply.usage.completion_tokens == native["eval_count"] <= 12  # type: ignore[union-attr]
    assert reply.usage.prompt_tokens == native["prompt_eval_count"]  # type: ignore[union-attr]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens  # type: ignore[union-attr]


def test_chat_stream_with_usage(oai: OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    whole = oai.chat.completions.create(model=MODEL, messages=messages, **GREEDY)  # type: ignore[arg-type]
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY,  # type: ignore[arg-type]
    ))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_raw_sse_framing(base_url: str) -> None:
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert "usage" not in json.loads(events[0][6:])


def test_json_mode_and_options_extension(oai: OpenAI) -> None:
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give a JSON object with a name."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=40,
    )
    assert reply.choices[0].message.content.lstrip().startswith("{")  # type: ignore[union-attr]
    # Beyond Ollama: `options` in the body are honoured (num_predict caps the reply like max_tokens would).
    capped = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], temperature=0,
        extra_body={"options": {"num_predict": 3}, "keep_alive": "5m"},
    )
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"  # type: ignore[union-attr]


def test_completions_stream_and_not(oai: OpenAI) -> None:
    prompt = "Once upon a time,"
    whole = oai.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.choices[0].text
    assert whole.usage.completion_tokens <= 12  # type: ignore[union-attr]
    chunks = list(oai.completions.create(
        model=MODEL, prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_embeddings_float_base64_and_dimensions(oai: OpenAI, base_url: str) -> None:
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by 8%."]
    native = httpx.post(base_url + "/api/embed", json={"model": MINILM, "input": texts}, timeout=120).json()
    as_float = oai.embeddings.create(model=MINILM, input=texts, encoding_format="float")
    as_b64 = oai.embeddings.create(model=MINILM, input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in as_float.data] == [0, 1] and as_float.usage.prompt_tokens == native["prompt_eval_count"]
    for i in range(2):
        assert np.allclose(as_float.data[i].embedding, native["embeddings"][i], atol=1e-6)
        assert np.allclose(as_b64.data[i].embedding, native["embeddings"][i], atol=1e-6)
    raw = httpx.post(base_url + "/v1/embeddings", json={"model": MINILM, "input": "x", "encoding_format": "BASE64"}).json()
    assert len(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")) == 384
    cut = oai.embeddings.create(model=MINILM, input="hello", dimensions=64, encoding_format="float")
    assert len(cut.data[0].embedding) == 64 and abs(np.linalg.norm(cut.data[0].embedding) - 1) < 1e-4


@pytest.mark.parametrize(
    ("path", "body", "status", "kind", "message"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_request_error",
         "[] is too short - 'messages'"),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
         "not_found_error", "model 'nope' not found"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, "invalid_request_error",
         "image URLs are not currently supported, please use base64 encoded data instead"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "reasoning_effort": "extreme"}, 400, "invalid_request_error", None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1]}, 400, "invalid_request_error",
         "invalid type for 'stop' field: float64"),
        ("/v1/embeddings", {"model": MINILM, "input": []}, 400, "invalid_request_error", "invalid input"),
        ("/v1/embeddings", {"model": MINILM, "input": "x", "encoding_format": "int8"}, 400, "invalid_request_error",
         "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64']."),
        ("/v1/embeddings", {"model": MINILM}, 400, "invalid_request_error", "invalid input"),
        ("/v1/chat/completions", "not json", 400, "invalid_request_error", None),
    ],
)
def test_errors_are_openai_shaped(base_url: str, path: str, body: Any, status: int, kind: str, message: str | None) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = httpx.post(base_url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    if message is not None:
        assert error["message"] == message


def test_unknown_v1_route_and_method_are_openai_shaped(base_url: str) -> None:
    r = httpx.get(base_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "api_error"


# -- files and batches ---------------------------------------------------------------------------------


def upload(oai: OpenAI, lines: list[Any], name: str = "requests.jsonl") -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    created = oai.files.create(file=(name, io.BytesIO(data)), purpose="batch")
    assert created.bytes == len(data) and created.filename == name and created.purpose == "batch"
    assert oai.files.content(created.id).read() == data
    return created.id


def wait_batch(oai: OpenAI, batch_id: str, timeout: float = 240) -> Any:
    state: dict[str, Any] = {}

    def ended() -> bool:
        state["b"] = oai.batches.retrieve(batch_id)
        return state["b"].status in ("completed", "failed", "cancelled", "expired")

    wait_for(ended, timeout, f"batch {batch_id}", interval=0.5)
    return state["b"]


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def chat_line(custom_id: str, content: str, **extra: Any) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], **GREEDY, **extra}}


def test_batch_round_trip_matches_sync_results(oai: OpenAI, base_url: str) -> None:
    prompts = {"q-a": "Name a fruit.", "q-b": "Name a river.", "q-c": "Name a planet."}
    file_id = upload(oai, [chat_line(k, v) for k, v in prompts.items()])
    batch = oai.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"team": "rag"}
    )
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 3  # type: ignore[union-attr]
    assert batch.metadata == {"team": "rag"} and batch.input_file_id == file_id and batch.expires_at
    # a batch is a corral job underneath
    job = httpx.get(f"{base_url}/api/jobs/{batch.id}").json()
    assert job["kind"] == "chat" and job["counts"]["total"] == 3
    done = wait_batch(oai, batch.id)
    assert done.status == "completed" and done.completed_at and done.finalizing_at and done.in_progress_at
    assert done.request_counts.completed == 3 and done.request_counts.failed == 0  # type: ignore[union-attr]
    assert done.output_file_id and done.error_file_id is None
    lines = jsonl(oai.files.content(done.output_file_id).text)
    assert [line["custom_id"] for line in lines] == list(prompts)
    meta = oai.files.retrieve(done.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(oai.files.content(done.output_file_id).read())
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
        body = line["response"]["body"]
        sync = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompts[line["custom_id"]]}], **GREEDY
        )
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == sync.choices[0].message.content
        assert body["usage"]["completion_tokens"] == sync.usage.completion_tokens  # type: ignore[union-attr]
    assert done.usage.output_tokens == sum(x["response"]["body"]["usage"]["completion_tokens"] for x in lines)  # type: ignore[union-attr]
    # the same file can be deleted afterwards: the batch keeps its results
    assert oai.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(file_id)
    assert len(jsonl(oai.files.content(done.output_file_id).text)) == 3


def test_embeddings_and_completions_batches(oai: OpenAI, base_url: str) -> None:
    emb = upload(oai, [
        {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"model": MINILM, "input": "alpha"}},
        {"custom_id": "e2", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": MINILM, "input": ["beta", "gamma"], "encoding_format": "base64", "dimensions": 32}},
    ])
    comp = upload(oai, [{"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                         "body": {"model": MODEL, "prompt": "Once upon a time,", **GREEDY}}])
    eb = oai.batches.create(input_file_id=emb, endpoint="/v1/embeddings", completion_window="24h")
    cb = oai.batches.create(input_file_id=comp, endpoint="/v1/completions", completion_window="24h")
    eb, cb = wait_batch(oai, eb.id), wait_batch(oai, cb.id)
    assert eb.status == cb.status == "completed"
    e_lines = {x["custom_id"]: x["response"]["body"] for x in jsonl(oai.files.content(eb.output_file_id).text)}
    native = httpx.post(base_url + "/api/embed", json={"model": MINILM, "input": "alpha"}).json()["embeddings"][0]
    assert np.allclose(e_lines["e1"]["data"][0]["embedding"], native, atol=1e-5)
    second = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in e_lines["e2"]["data"]]
    assert [len(v) for v in second] == [32, 32] and [d["index"] for d in e_lines["e2"]["data"]] == [0, 1]
    c_line = jsonl(oai.files.content(cb.output_file_id).text)[0]["response"]["body"]
    sync = oai.completions.create(model=MODEL, prompt="Once upon a time,", **GREEDY)
    assert c_line["object"] == "text_completion" and c_line["choices"][0]["text"] == sync.choices[0].text


def test_invalid_input_file_fails_the_batch_with_line_numbers(oai: OpenAI) -> None:
    file_id = upload(oai, [
        chat_line("a", "hi"),
        chat_line("a", "duplicate id"),
        "{not json",
        {**chat_line("c", "x"), "url": "/v1/embeddings"},
        chat_line("d", "x", stream=True),
        {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": []}},
        chat_line("f", "fine"),
    ])
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    errors = {e.line: e for e in batch.errors.data}  # type: ignore[union-attr]
    assert sorted(errors) == [2, 3, 4, 5, 6]
    assert errors[2].code == "duplicate_custom_id" and errors[3].code == "invalid_json_line"
    assert errors[4].code == "mismatched_endpoint" and errors[6].message == "[] is too short - 'messages'"
    assert batch.request_counts.total == 0  # type: ignore[union-attr]
    # nothing was queued for it, and it stays readable
    assert oai.batches.retrieve(batch.id).status == "failed"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": "/v1/chat/completions", "completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/moderations", "completion_window": "24h"}, "endpoint"),
        ({"endpoint": "/v1/chat/completions", "completion_window": "24h", "input_file_id": "file-nope"}, "input_file_id"),
    ],
)
def test_batch_create_errors(base_url: str, oai: OpenAI, body: dict, param: str) -> None:
    file_id = upload(oai, [chat_line("a", "hi")])
    r = httpx.post(base_url + "/v1/batches", json={"input_file_id": file_id, **body})
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_cancel_keeps_partial_results_and_lists_with_cursor(oai: OpenAI, base_url: str) -> None:
    lines = [chat_line(f"r{i}", f"Write a long story about the number {i}.", max_tokens=48) for i in range(16)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: httpx.get(f"{base_url}/api/jobs/{batch.id}").json()["counts"]["succeeded"] >= 1, 180,
             "the first request to finish", interval=0.2)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_batch(oai, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert 1 <= counts.completed < 16  # type: ignore[union-attr]
    out = jsonl(oai.files.content(done.output_file_id).text)
    err = jsonl(oai.files.content(done.error_file_id).text)
    assert len(out) == counts.completed and len(out) + len(err) == 16  # type: ignore[union-attr]
    assert {x["error"]["code"] for x in err} == {"batch_cancelled"} and all(x["response"] is None for x in err)
    assert {x["custom_id"] for x in out} | {x["custom_id"] for x in err} == {f"r{i}" for i in range(16)}
    # cursor paging, newest first
    first = oai.batches.list(limit=1)
    assert len(first.data) == 1 and first.data[0].id == batch.id and first.has_more
    second = oai.batches.list(limit=1, after=first.data[0].id)
    assert second.data[0].id != batch.id and second.data[0].created_at <= first.data[0].created_at
    seen = [b.id for b in oai.batches.list(limit=2)]  # iterating the page follows the cursor
    assert seen == [b.id for b in oai.batches.list(limit=100).data] and seen[0] == batch.id


def test_file_listing_and_bad_uploads(oai: OpenAI, base_url: str) -> None:
    file_id = upload(oai, [chat_line("a", "hi")], name="listed.jsonl")
    assert file_id in {f.id for f in oai.files.list(purpose="batch")}
    r = httpx.post(base_url + "/v1/files", files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "bogus"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = httpx.post(base_url + "/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert httpx.get(base_url + "/v1/files/file-nope").status_code == 404
    assert httpx.get(base_url + "/v1/batches/batch_nope").json()["error"]["type"] == "not_found_error"


def test_a_batch_past_its_window_expires_with_partial_results(oai: OpenAI, base_url: str, settings: Settings) -> None:
    # One short request, so that one finishes soon; the rest long enough (about 7000 tokens in all) that the batch
    # cannot complete within the reconciler's 2 s between the window's end and its next pass.
    lines = [chat_line("x0", "Name a color.", max_tokens=8)]
    lines += [chat_line(f"x{i}", f"Write a long story about the color {i}.", max_tokens=480) for i in range(1, 16)]
    batch = oai.batches.create(input_file_id=upload(oai, lines), endpoint="/v1/chat/completions", completion_window="24h")
    assert abs(batch.expires_at - batch.created_at - 24 * 3600) <= 1  # type: ignore[operator]
    wait_for(lambda: httpx.get(f"{base_url}/api/jobs/{batch.id}").json()["counts"]["succeeded"] >= 1, 180,
             "the first request to finish", interval=0.2)
    # 24 hours pass: move the window's end into the past (the reconciler in the worker does the rest).
    with sessions(settings)() as session:
        session.execute(update(Job).where(Job.id == batch.id).values(expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    done = wait_batch(oai, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at and done.completed_at is None
    counts = done.request_counts
    assert 1 <= counts.completed < 16  # type: ignore[union-attr]
    out = jsonl(oai.files.content(done.output_file_id).text)
    err = jsonl(oai.files.content(done.error_file_id).text)
    assert len(out) == counts.completed and len(out) + len(err) == 16  # type: ignore[union-attr]
    assert all(x["response"]["status_code"] == 200 for x in out)
    assert {x["error"]["code"] for x in err} == {"batch_expired"} and all(x["response"] is None for x in err)
    job = httpx.get(f"{base_url}/api/jobs/{batch.id}").json()
    assert job["status"] == "expired" and job["expires_at"]
    assert httpx.get(f"{base_url}/api/jobs", params={"status": "expired"}).json()["jobs"][0]["id"] == batch.id
