"""Tool calls in each template family's own form, found wherever they start (after prose, after whitespace),
however the stream cuts them, and only for declared tools; the family is chosen from the template."""

from __future__ import annotations

import pytest

from corral.toolcalls import ToolCallHold, split_tool_calls, tool_format

NAMES = {"get_weather", "get_time"}
PROSE = "Let me check that for you.\n\n"
CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_time", "arguments": {"zone": "CET"}}]',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
              '{"name": "get_time", "parameters": {"zone": "CET"}}',
    "deepseek": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"zone": "CET"}'
                "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "harmony": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
               '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>'
               '{"zone": "CET"}<|call|>',
}
TEMPLATES = {
    "hermes": "{% for tool in tools %}{{ tool }}{% endfor %}<tool_call>",
    "mistral": "[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]",
    "llama3": "<|start_header_id|>ipython<|end_header_id|>{{ tools }}<|python_tag|>",
    "deepseek": "<｜tool▁calls▁begin｜>{{ tools }}",
    "harmony": "<|start|>assistant<|channel|>commentary to=functions.{{ name }}",
    "json": "{{ range .Tools }}{{ json . }}{{ end }}",
}


def stream(text: str, family: str, cut: int) -> tuple[str, list[dict]]:  # type: ignore[type-arg]
    shown: list[str] = []
    def show(piece: str) -> bool:
        shown.append(piece)
        return False

    hold = ToolCallHold(NAMES, show, family)
    for i in range(0, len(text), cut):
        hold.feed(text[i:i + cut])
    calls, rest = hold.finish()
    return "".join(shown) + rest, calls


@pytest.mark.parametrize("family", list(CALLS))
@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_calls_after_prose_in_every_family(family: str, cut: int) -> None:
    content, calls = stream(PROSE + CALLS[family], family, cut)
    assert content == PROSE  # the prose streamed, the calls were held and parsed
    assert [(c["function"]["name"], c["function"]["arguments"], c["function"]["index"]) for c in calls] == [
        ("get_weather", {"city": "Paris"}, 0), ("get_time", {"zone": "CET"}, 1)]
    whole, batch_calls = split_tool_calls(PROSE + CALLS[family], NAMES, family)  # a batch item's reply, in one piece
    assert whole == PROSE and [c["function"] for c in batch_calls] == [c["function"] for c in calls]


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_the_family_comes_from_the_template(family: str) -> None:
    assert tool_format(TEMPLATES[family]) == family


def test_what_is_not_a_call_stays_text() -> None:
    unknown = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    assert stream(PROSE + unknown, "hermes", 5) == (PROSE + unknown, [])
    assert stream("Use <tool_call> tags like this.", "hermes", 4) == ("Use <tool_call> tags like this.", [])
    bare = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    content, calls = stream("  " + bare, "hermes", 6)  # a bare JSON answer is a call in every family
    assert content.strip() == "" and calls[0]["function"]["arguments"] == {"city": "Oslo"}
    assert stream('The JSON is {"a": 1}.', "json", 3) == ('The JSON is {"a": 1}.', [])
    assert stream("<tool_ca", "hermes", 2) == ("<tool_ca", [])  # a marker that never completed is text
