"""The Go-template subset of corral/modelstore/gotemplate.py, on templates written the way Ollama's library writes them."""

from __future__ import annotations

import pytest

from corral.modelstore.gotemplate import TemplateError, parse, render
from tests.helpers import CHATML_TEMPLATE as CHATML


def test_chatml_with_messages() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour."}]
    assert render(parse(CHATML), {"Messages": messages, "System": "Be brief.", "Prompt": "", "Response": ""}) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_legacy_prompt_and_response() -> None:
    out = render(parse(CHATML), {"Messages": [], "System": "", "Prompt": "Why?", "Response": ""})
    assert out == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"


def test_tools_and_tool_calls_as_llama3_templates_write_them() -> None:
    template = (
        '{{- range .Tools }}{"name": "{{ .Function.Name }}", "spec": {{ json .Function }}}\n{{ end }}'
        "{{- range .Messages }}[{{ .Role }}]"
        "{{- if .ToolCalls }}{{ range .ToolCalls }}call:{{ .Function.Name }}({{ json .Function.Arguments }}){{ end }}"
        "{{- else if eq .Role \"tool\" }} result of {{ .ToolName }}: {{ .Content }}"
        "{{- else }} {{ .Content }}{{ end }}\n{{ end }}"
    )
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "4 C", "tool_name": "weather"},
    ]
    assert render(parse(template), {"Tools": tools, "Messages": messages}) == (
        '{"name": "weather", "spec": {"name":"weather","parameters":{"type":"object"}}}\n'
        "[user] Weather in Oslo?\n"
        '[assistant]call:weather({"city":"Oslo"})\n'
        "[tool] result of weather: 4 C\n"
    )


def test_variables_with_break_continue_and_else() -> None:
    template = ("{{ $n := 0 }}{{ range .Items }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if gt . 3 }}{{ break }}{{ end }}"
                "{{ $n = . }}{{ . }},{{ else }}none{{ end }} last={{ $n }}{{ with .Missing }}x{{ else }} no{{ end }}")
    assert render(parse(template), {"Items": [1, 2, 3, 4, 5]}) == "1,3, last=3 no"
    assert render(parse(template), {"Items": []}) == "none last=0 no"


def test_pipelines_literals_and_comments() -> None:
    template = '{{/* a comment */}}{{ .Name | printf "%s!" }} {{ print "a" 1 true }} {{ index .Map "k" }} {{ len "abc" }}'
    assert render(parse(template), {"Name": "Ada", "Map": {"k": "v"}}) == "Ada! a1true v 3"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ if .X }}open", "has no {{end}}"),
        ("{{ end }}", "unexpected {{end}}"),
        ('{{ define "x" }}{{ end }}', "{{define}} is not supported"),
        ('{{ template "x" . }}', "{{template}} is not supported"),
        ("{{ upper .X }}", 'function "upper" not defined'),
        ("{{ break }}", "{{break}} outside {{range}}"),
        ("{{ .X ", "unclosed action"),
    ],
)
def test_templates_outside_the_subset_are_refused_when_parsed(template: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        parse(template)


def test_tool_results_and_thinking_reach_a_go_template() -> None:
    """``tool_name``/``tool_call_id`` and an assistant turn's ``thinking`` get to the template, from either API."""
    from corral.wire.ollama import Message
    from corral.wire.openai import ChatCompletionRequest

    template = ("{{ range .Messages }}{{ .Role }}|{{ if .ToolName }}{{ .ToolName }}|{{ end }}"
                "{{ if .Thinking }}({{ .Thinking }}){{ end }}{{ .Content }}\n{{ end }}")
    native = [Message(role="assistant", content="", thinking="weather first").for_template(),
              Message(role="tool", content="12C", tool_name="get_weather").for_template()]
    assert render(parse(template), {"Messages": native}) == "assistant|(weather first)\ntool|get_weather|12C\n"
    openai = ChatCompletionRequest(model="m", messages=[
        {"role": "assistant", "content": "", "reasoning": "weather first"},
        {"role": "tool", "content": "12C", "tool_call_id": "get_weather"}]).native_messages()
    assert render(parse(template), {"Messages": openai}) == "assistant|(weather first)\ntool|get_weather|12C\n"


@pytest.mark.parametrize("fmt,args,out", [
    ("{:>5000000}", ["x"], "{:>5000000}%!(EXTRA string=x)"),  # Go prints Python's format syntax as it stands
    ("%s and %d", ["a", 3], "a and 3"),
    ("%q", ['say "hi"'], '"say \\"hi\\""'),
    ("%v %v %v %v", [True, None, 1.5, 1000000.0], "true <nil> 1.5 1e+06"),
    ("%5s|%-5s|%05d|%+d", ["ab", "cd", -42, 7], "   ab|cd   |-0042|+7"),
    ("%.3s", ["abcdef"], "abc"),
    ("%d", ["x"], "%!d(string=x)"),
    ("%s %s", ["a"], "a %!s(MISSING)"),
    ("100%%", [], "100%"),
    ("%5000000s", ["x"], "%!(BADWIDTH)"),
    ("%v", [[1, "a"]], "[1 a]"),
    ("%v", [{"b": 1, "a": 2}], "map[a:2 b:1]"),
    ("end %", [], "end %!(NOVERB)"),
])
def test_printf_is_gos(fmt: str, args: list[object], out: str) -> None:
    from corral.modelstore.goprintf import sprintf

    assert sprintf(fmt, args) == out
    if not args:
        return
    template = "{{ printf " + json_literal(fmt) + " " + " ".join(f"(index .A {i})" for i in range(len(args))) + " }}"
    assert render(parse(template), {"A": args}) == out


def json_literal(text: str) -> str:
    import json

    return json.dumps(text)


def test_printf_of_a_five_megabyte_width_builds_no_large_prompt() -> None:
    out = render(parse('{{ printf "{:>5000000}" .Prompt }}'), {"Prompt": "x"})
    assert len(out) < 100


def test_templates_nested_past_the_limit_are_refused_at_parse() -> None:
    from corral.modelstore.gotemplate import MAX_NESTING

    deep_ifs = "{{if .A}}" * 1200 + "x" + "{{end}}" * 1200
    with pytest.raises(TemplateError, match="nested deeper than"):
        parse(deep_ifs)
    with pytest.raises(TemplateError, match="nested deeper than"):
        parse("{{ " + "(" * 1200 + ".A" + ")" * 1200 + " }}")
    with pytest.raises(TemplateError, match="nested deeper than"):
        parse("{{if .A}}a" + "{{else if .B}}b" * 1200 + "{{end}}")
    fine = "{{if .A}}" * (MAX_NESTING - 1) + "x" + "{{end}}" * (MAX_NESTING - 1)
    assert render(parse(fine), {"A": True}) == "x"


def test_a_render_past_the_output_bound_is_refused() -> None:
    messages = [{"content": "x" * 10_000}] * 100
    template = "{{ range .Messages }}{{ range $.Messages }}{{ .Content }}{{ end }}{{ end }}"
    with pytest.raises(TemplateError, match="longer than"):
        render(parse(template), {"Messages": messages})


def test_strings_built_in_variables_and_nested_ranges_are_bounded_too() -> None:
    """The review's bypass: a variable doubled per message writes nothing until the end (1 GB from 26 messages)."""
    doubling = '{{ $x := "aaaaaaaaaaaaaaaa" }}{{ range .Messages }}{{ $x = print $x $x }}{{ end }}{{ len $x }}'
    with pytest.raises(TemplateError, match="longer than"):
        render(parse(doubling), {"Messages": [{}] * 30})
    quiet = "{{ range .Messages }}{{ range $.Messages }}{{ end }}{{ end }}"  # writes nothing, runs N squared
    with pytest.raises(TemplateError, match="steps"):
        render(parse(quiet), {"Messages": [{}] * 3000})
    assert render(parse(quiet), {"Messages": [{}] * 100}) == ""
