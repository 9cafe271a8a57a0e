"""Pure functions: Ollama's env and duration parsing, model names, stop strings, formatting."""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from corral.errors import BadRequest
from corral.modelstore.gguf_meta import human_number
from corral.modelstore.store import ModelName
from corral.settings import (
    Settings,
    parse_go_duration,
    parse_keep_alive,
    parse_ollama_host,
    parse_request_keep_alive,
)
from corral.timefmt import rfc3339
from workers.sampling import StopMatcher


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("0.0.0.0:8080", ("http", "0.0.0.0", 8080)),
        ("http://example.com", ("http", "example.com", 80)),
        ("https://example.com", ("https", "example.com", 443)),
        ("http://[::1]:9000", ("http", "::1", 9000)),
        (":5000", ("http", "127.0.0.1", 5000)),
    ],
)
def test_ollama_host_is_parsed_like_ollama(value: str, expected: tuple[str, str, int]) -> None:
    assert parse_ollama_host(value) == expected


def test_durations_follow_go() -> None:
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("1h30m") == 5400
    assert parse_go_duration("-1m") == -60
    assert parse_go_duration("0") == 0
    with pytest.raises(ValueError, match='missing unit in duration "10"'):
        parse_go_duration("10")
    for empty in ("", " "):  # found by schemathesis: `"keep_alive": ""` was an IndexError (a 500)
        with pytest.raises(ValueError, match="time: invalid duration"):
            parse_go_duration(empty)


def test_keep_alive_numbers_are_seconds_and_negative_is_forever() -> None:
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive("30") == 30  # OLLAMA_KEEP_ALIVE accepts bare seconds
    assert math.isinf(parse_keep_alive(-1))
    assert math.isinf(parse_request_keep_alive("-1m"))
    with pytest.raises(ValueError):
        parse_request_keep_alive("-1")  # the request field needs a unit, as in Ollama
    with pytest.raises(ValueError, match="Unsupported type: 'bool'"):
        parse_keep_alive(True)


def test_settings_read_ollama_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:9999")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "10m")
    monkeypatch.setenv("OLLAMA_ORIGINS", "chrome-extension://*, https://app.example")
    monkeypatch.setenv("OLLAMA_MODELS", "/srv/models")
    s = Settings()
    assert s.bind == ("0.0.0.0", 9999)
    assert s.keep_alive == 600
    assert s.origins == ["chrome-extension://*", "https://app.example"]
    assert str(s.models_path) == "/srv/models"


@pytest.mark.parametrize(
    ("text", "display"),
    [
        ("smollm2", "smollm2:latest"),
        ("SmolLM2:135M", "smollm2:135m"),
        ("me/model:v1", "me/model:v1"),
        ("host.example/ns/m:t", "host.example/ns/m:t"),
    ],
)
def test_model_names_parse_to_shortest_display(text: str, display: str) -> None:
    assert ModelName.parse(text).display == display


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "/abs/path", "a/../b", "m\x00", "a/b/c/d", "x:..", "bad name"])
def test_model_names_cannot_escape_the_store(bad: str) -> None:
    with pytest.raises(BadRequest, match="invalid model name"):
        ModelName.parse(bad)


def test_human_number_matches_ollama() -> None:
    assert human_number(134_515_008) == "134.52M"
    assert human_number(3_212_749_824) == "3.2B"
    assert human_number(7_000_000_000) == "7B"


def test_stop_matcher_holds_back_partial_stops() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D tail") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("x") == ("Ex", False)


def test_timestamps_are_rfc3339nano() -> None:
    moment = datetime(2023, 8, 4, 19, 22, 45, 499127, tzinfo=timezone.utc)
    assert rfc3339(moment) == "2023-08-04T19:22:45.499127Z"
    assert rfc3339(moment.replace(microsecond=500000)) == "2023-08-04T19:22:45.5Z"
    west = moment.astimezone(timezone(timedelta(hours=-7)))
    assert rfc3339(west) == "2023-08-04T12:22:45.499127-07:00"


def test_decode_slots_follow_ollama_num_parallel_or_fit_the_kv_budget() -> None:
    from workers.engine import parallel_slots

    smollm2 = 30 * 2 * 192 * 2  # layers x (K, V) x KV width x f16 bytes
    assert parallel_slots(0, smollm2, 4096) == 8
    assert parallel_slots(3, smollm2, 4096) == 3  # OLLAMA_NUM_PARALLEL wins
    llama_8b = 32 * 2 * 1024 * 2
    assert parallel_slots(0, llama_8b, 8192) == 2  # 1 GiB of cache per slot
    assert parallel_slots(0, llama_8b, 131072) == 1  # never zero


def test_settings_travel_to_a_child_process_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Settings.environment()`` is what `corral up` and the tests hand their children: it must rebuild the
    same settings there, whatever was set here."""
    original = Settings(
        home=Path("/tmp/corral-home"), host="0.0.0.0:8080", keep_alive=-1, origins=["https://a.example", "app://*"],
        require_api_key=True, chunk_size=3, redis_url="redis://127.0.0.1:1/2", max_predict=7, cpu_weights="native",
    )
    for name in list(os.environ):
        if name.startswith(("OLLAMA_", "CORRAL_")) or name in ("REDIS_URL", "DATABASE_URL"):
            monkeypatch.delenv(name)
    for name, value in original.environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_a_schema_within_the_grammar_budget_passes_at_any_allowed_depth() -> None:
    from jobs.ingest import validate_item

    schema: dict[str, object] = {"type": "string", "maxLength": 1000}
    for _ in range(10):
        schema = {"type": "object", "properties": {"x": schema}}
    assert validate_item("generate", 1, {"prompt": "x", "format": schema})[1]["format"] == schema
    for _ in range(30):
        schema = {"type": "object", "properties": {"x": schema}}
    with pytest.raises(BadRequest, match="nested deeper than 32 levels"):
        validate_item("generate", 1, {"prompt": "x", "format": schema})


@pytest.mark.parametrize("line", [
    {"custom_id": "doc-1", "prompt": "Summarise it.", "options": {"num_predict": 16, "temperature": 0}},
    {"prompt": "Hi", "system": "Be brief.", "metadata": {"source": "a.txt", "n": [1, 2]}},
    {"custom_id": None, "prompt": "Hi", "options": None, "system": None},
    {"prompt": "Hi", "options": {"stop": ["\n"], "seed": 3}},
    {"custom_id": "x" * 512, "prompt": "Hi"},
])
def test_a_plain_generate_line_skips_the_model_and_gets_the_same_body(line: dict) -> None:
    """The fast path for the commonest lines (jobs/ingest.py ``_plain_generate``) stores what the item model
    would: the same custom_id and body."""
    from jobs import ingest

    assert ingest._plain_generate(dict(line)) is not None
    fast = ingest.validate_item("generate", 1, dict(line))
    original = ingest._PLAIN_GENERATE
    try:
        ingest._PLAIN_GENERATE = {}  # every line takes the model
        assert ingest.validate_item("generate", 1, dict(line)) == fast
    finally:
        ingest._PLAIN_GENERATE = original


@pytest.mark.parametrize("line, error", [
    ({"custom_id": "x" * 513, "prompt": "Hi"}, "custom_id"),
    ({"custom_id": 7, "prompt": "Hi"}, "custom_id"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "Hi", "options": {"num_predict": "many"}}, "num_predict"),
    ({"prompt": "Hi", "metadata": [1]}, "metadata"),
])
def test_lines_off_the_fast_path_still_get_the_models_errors(line: dict, error: str) -> None:
    from jobs.ingest import validate_item

    with pytest.raises(BadRequest, match=f"^line 1: .*{error}"):
        validate_item("generate", 1, line)


def test_the_error_tree_drawn_in_corral_errors_lists_every_class_with_its_status() -> None:
    import inspect

    import corral.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.CorralError) and c.__module__ == errors.__name__]
    drawn = errors.__doc__ or ""
    for cls in classes:
        assert f"{cls.__name__} ({cls.status_code})" in drawn, cls.__name__
