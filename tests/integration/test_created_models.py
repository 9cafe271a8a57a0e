"""A model made with /api/create behaves as its layers say, on a real worker: PARAMETER as default options
(the request's own win), SYSTEM as the default system prompt, MESSAGE before every chat; in sync requests and in
batch jobs alike."""

from __future__ import annotations

from typing import Any

import httpx

from tests.helpers import MODEL, results, submit, wait_done

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def create(base_url: str, **body: Any) -> None:
    r = httpx.post(base_url + "/api/create", json={"stream": False, **body}, timeout=120)
    assert (r.status_code, r.json()) == (200, {"status": "success"}), r.text


def chat(base_url: str, model: str, **extra: Any) -> dict[str, Any]:
    r = httpx.post(base_url + "/api/chat", timeout=120,
                   json={"model": model, "messages": CHAT, "stream": False, **extra})
    assert r.status_code == 200, r.text
    reply: dict[str, Any] = r.json()
    return reply


def test_parameters_system_and_messages_change_what_the_model_does(base_url: str) -> None:
    create(base_url, model="terse", **{"from": MODEL}, parameters={"num_predict": 3, "temperature": 0})
    assert chat(base_url, "terse")["eval_count"] == 3  # PARAMETER num_predict
    assert chat(base_url, "terse", options={"num_predict": 5})["eval_count"] == 5  # the request's own wins

    plain = chat(base_url, MODEL, options={"num_predict": 1})["prompt_eval_count"]
    create(base_url, model="french", **{"from": "terse"}, system="You are a French tutor. Answer in French only.",
           messages=[{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "Bonjour ! Posez votre question."}])
    briefed = chat(base_url, "french")
    assert briefed["eval_count"] == 3  # the layers of `from` are kept
    assert briefed["prompt_eval_count"] > plain + 10  # the system prompt and the conversation went in front
    own_system = chat(base_url, "french", messages=[{"role": "system", "content": "Hi."}, *CHAT])
    assert own_system["prompt_eval_count"] < briefed["prompt_eval_count"]  # a request's own system prompt wins


def test_a_batch_job_on_a_created_model_gets_its_layers_too(base_url: str) -> None:
    create(base_url, model="terse-jobs", **{"from": MODEL}, parameters={"num_predict": 2, "temperature": 0})
    job = submit(base_url, model="terse-jobs", kind="chat", items=[{"messages": CHAT}, {"messages": CHAT}])
    done = wait_done(base_url, job["id"])
    assert done["counts"]["succeeded"] == 2
    assert [line["response"]["eval_count"] for line in results(base_url, job["id"])] == [2, 2]


# SmolLM2's own chat template (the GGUF's Jinja), written as an Ollama TEMPLATE: with a system message given,
# both render the same prompt.
CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def test_a_template_layer_renders_the_prompt(base_url: str) -> None:
    create(base_url, model="chatml", **{"from": MODEL}, template=CHATML)
    messages = [{"role": "system", "content": "Be brief."}, *CHAT]
    ours = chat(base_url, "chatml", messages=messages, options={"num_predict": 8, "temperature": 0})
    gguf = chat(base_url, MODEL, messages=messages, options={"num_predict": 8, "temperature": 0})
    assert abs(ours["prompt_eval_count"] - gguf["prompt_eval_count"]) <= 1  # the same prompt (BOS aside)
    assert ours["message"]["content"].split()[:3] == gguf["message"]["content"].split()[:3]
    create(base_url, model="chatml-odd", **{"from": MODEL}, template="{{ .Prompt }}")  # an older, bare template
    odd = chat(base_url, "chatml-odd", messages=CHAT, options={"num_predict": 2})
    assert odd["prompt_eval_count"] < gguf["prompt_eval_count"]  # just the question: the template decided
