"""Tool calling: rendering a chat with tools, and parsing tool calls out of the generated text.

Unit tests, no model: the demo model's weights are random, so it never writes
a tool call, and its template has no tool-call format. A crafted template (a
jinja2 one in a stand-in tokenizer with mlx-lm's tool attributes) and crafted
outputs stand in for a real tool-calling model; the server's side of tools is
tested against a real server in test_serve_api.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from trio_runner.mlx import Completion, Generate, ToolChat, ToolCompletion, ToolMlxLmRunner
from trio_runner.mlx._tools import ToolsUnsupported, split_tool_calls
from trio_runner.serve._openai import ChunkWriter, Limits, parse_chat, response_body

jinja2 = pytest.importorskip("jinja2")

START, END = "<tool_call>", "</tool_call>"
# Like a Qwen-style template: tools listed in the system turn, calls written as JSON between markers.
TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}"
    "({{ c.function.arguments.city }})</tool_call>{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def parse_json_call(text: str, tools: Any) -> Any:
    """The shape of mlx-lm's json_tools parser: the JSON between the markers."""
    return json.loads(text.strip())


class Tokenizer:
    """A stand-in for mlx-lm's TokenizerWrapper: the template, and its tool-call format (or none)."""

    def __init__(self, tool_calling: bool = True) -> None:
        self.template = jinja2.Environment().from_string(TEMPLATE)
        self.has_tool_calling = tool_calling
        self.tool_call_start = START if tool_calling else None
        self.tool_call_end = END if tool_calling else None
        self.tool_parser = parse_json_call if tool_calling else None
        self.rendered = ""

    def apply_chat_template(
        self, messages: Any, tools: Any, add_generation_prompt: bool, tokenize: bool
    ) -> str:
        assert not tokenize
        self.rendered = self.template.render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
        return self.rendered

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]


def _runner(tokenizer: Tokenizer, output: str, monkeypatch: pytest.MonkeyPatch) -> ToolMlxLmRunner:
    """A runner whose model 'generates' ``output`` for whatever prompt it encodes."""
    runner = ToolMlxLmRunner()
    runner.tokenizer = tokenizer

    def handle(self: ToolMlxLmRunner, request: Generate, ctx: Any) -> Completion:
        ids = self.encode(request)
        return Completion(output, "stop", len(ids), 5, 1.0, 1.0, 0.0)

    monkeypatch.setattr("trio_runner.mlx._runner.MlxLmRunner.handle", handle)
    return runner


def _chat(body: dict[str, Any]) -> Any:
    return parse_chat({"messages": [{"role": "user", "content": "Weather in Paris?"}], **body}, Limits("m"))


# -- parsing ---------------------------------------------------------------------------


def test_a_tool_call_between_the_markers_is_parsed_and_the_text_around_it_is_the_content() -> None:
    text = 'Let me look. <tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call> Done.'
    content, calls = split_tool_calls(text, START, END, parse_json_call, [WEATHER])
    assert content == "Let me look.  Done."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("weather", {"city": "Paris"})]
    assert calls[0]["id"].startswith("call_")


def test_back_to_back_tool_calls_are_each_parsed_in_order() -> None:
    one = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    two = '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = split_tool_calls(one + two, START, END, parse_json_call, [WEATHER])
    assert content == ""
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "Oslo"]


def test_a_tool_call_cut_off_or_malformed_stays_in_the_content() -> None:
    cut = 'Sure <tool_call>{"name": "weather", "argu'
    content, calls = split_tool_calls(cut, START, END, parse_json_call, [WEATHER])
    assert (content, calls) == (cut, [])
    bad = "a <tool_call>not json</tool_call> b"
    assert split_tool_calls(bad, START, END, parse_json_call, [WEATHER]) == (bad, [])


def test_a_format_without_an_end_marker_takes_the_rest_of_the_text_and_a_parser_may_return_a_list() -> None:
    def parse_list(text: str, tools: Any) -> Any:
        return [{"name": name, "arguments": {}} for name in text.split(",")]

    content, calls = split_tool_calls("hi[TOOL_CALLS]a,b", "[TOOL_CALLS]", "", parse_list, None)
    assert content == "hi"
    assert [(c["name"], c["arguments"]) for c in calls] == [("a", "{}"), ("b", "{}")]


# -- the runner: rendering through the template, and the result --------------------------


def test_tools_and_tool_calls_in_the_history_are_rendered_through_the_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = Tokenizer()
    runner = _runner(tokenizer, "It is sunny.", monkeypatch)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    parsed = parse_chat({"messages": history, "tools": [WEATHER]}, Limits("m"))
    completion = runner.handle(parsed.generate, None)  # pyright: ignore[reportArgumentType]
    assert tokenizer.rendered == (
        "<|system|>tools: weather<|end|><|user|>Weather in Paris?<|end|>"
        "<|assistant|><tool_call>weather(Paris)</tool_call><|end|><|tool|>[c1]sunny<|end|><|assistant|>"
    )
    assert isinstance(completion, ToolCompletion) and completion.tool_calls == ()
    assert completion.content == "It is sunny."


def test_a_generated_tool_call_becomes_tool_calls_with_finish_reason_tool_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'
    runner = _runner(Tokenizer(), output, monkeypatch)
    completion = runner.handle(_chat({"tools": [WEATHER]}).generate, None)  # pyright: ignore[reportArgumentType]
    body = response_body("chat", "m", completion)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_a_streamed_tool_call_arrives_as_a_tool_calls_delta_before_the_finish_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = 'ok <tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    runner = _runner(Tokenizer(), output, monkeypatch)
    parsed = _chat({"tools": [WEATHER], "stream": True})
    assert parsed.buffered
    completion = runner.handle(parsed.generate, None)  # pyright: ignore[reportArgumentType]
    events = ChunkWriter("chat", "m").finish(completion, include_usage=False).decode().split("\n\n")
    chunks = [json.loads(e[len("data: ") :]) for e in events if e.startswith("data: {")]
    assert [c["choices"][0]["delta"] for c in chunks[:1]] == [{"content": "ok "}]
    (delta,) = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert delta["index"] == 0 and delta["function"]["name"] == "weather"
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-2] == "data: [DONE]"


def test_tools_for_a_template_without_a_tool_call_format_fail_with_tools_unsupported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = _runner(Tokenizer(tool_calling=False), "", monkeypatch)
    with pytest.raises(ToolsUnsupported, match="no tool-call format"):
        runner.handle(_chat({"tools": [WEATHER]}).generate, None)  # pyright: ignore[reportArgumentType]


def test_a_plain_chat_stays_a_plain_generate_and_tool_choice_none_renders_no_tools() -> None:
    assert type(_chat({}).generate) is Generate
    none = _chat({"tools": [WEATHER], "tool_choice": "none"}).generate
    assert type(none) is Generate
    assert isinstance(_chat({"tools": [WEATHER]}).generate, ToolChat)
