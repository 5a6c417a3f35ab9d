"""Tool-call and reasoning parsers on canned text in the formats the families really emit (taken from their
published chat templates and tool-calling docs), parsed whole and streamed piece by piece: the streamed
deltas must add up to the whole parse, names before arguments."""

from __future__ import annotations

import json

import pytest

from dockyard.errors import ConfigError
from dockyard.reasoning import reasoning_parser_class
from dockyard.server.chat_output import ChoiceOutputParser
from dockyard.tool_parsers import TOOL_PARSERS, RequiredToolParser, ToolCallStreamer, ToolParser, get_tool_parser

WEATHER = {"location": "San Francisco, CA", "unit": "celsius"}
# DeepSeek-V3's tool-call markers (its tokenizer's added tokens)
CALLS, CALL, SEP, END, CALLS_END = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                    "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>")

# parser, generated text, expected content, expected calls (name, arguments)
CASES = [
    ("hermes", 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"location": "San Francisco, CA", '
               '"unit": "celsius"}}\n</tool_call>', "Let me check.", [("get_weather", WEATHER)]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n<tool_call>\n'
               '{"name": "get_time", "arguments": {"tz": "CET", "fmt": {"h": 24}}}\n</tool_call>', "",
     [("get_weather", {"location": "Paris"}), ("get_time", {"tz": "CET", "fmt": {"h": 24}})]),
    ("hermes", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par', '<tool_call>\n{"name": '
               '"get_weather", "arguments": {"location": "Par', []),  # cut off by max_tokens: left as text
    ("llama3_json", '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", "unit": "celsius"}}', "",
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [1, 2]}}',
     "", [("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    ("llama3_json", "The weather is sunny {maybe}.", "The weather is sunny {maybe}.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "San Francisco, CA", '
                '"unit": "celsius"}}, {"name": "get_time", "arguments": {}}]', "",
     [("get_weather", WEATHER), ("get_time", {})]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"location": "San Francisco, CA", "unit": "celsius"}'
                '[TOOL_CALLS]get_time[ARGS]{"tz": "PST"}', "Sure.",
     [("get_weather", WEATHER), ("get_time", {"tz": "PST"})]),
    ("deepseek_v3", f"I'll look.{CALLS}{CALL}function{SEP}get_weather\n```json\n"
                    f'{{"location": "San Francisco, CA", "unit": "celsius"}}\n```{END}\n{CALL}'
                    f'function{SEP}get_time\n```json\n{{"tz": "PST"}}\n```{END}{CALLS_END}',
     "I'll look.", [("get_weather", WEATHER), ("get_time", {"tz": "PST"})]),
    ("deepseek_v3", f'{CALLS}{CALL}get_weather{SEP}{{"location": "San Francisco, CA", '
                    f'"unit": "celsius"}}{END}{CALLS_END}', "", [("get_weather", WEATHER)]),
    ("openai", "<|channel|>analysis<|message|>User wants weather. Call get_weather.<|end|><|start|>assistant"
               "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
               '{"location":"San Francisco, CA","unit":"celsius"}<|call|>', "", [("get_weather", WEATHER)]),
    ("openai", "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.",
     "It is 4.", []),
    ("pythonic", "[get_weather(location='San Francisco, CA', unit=\"celsius\"), get_time(tz='PST', opts={'h': [24]})]",
     "", [("get_weather", WEATHER), ("get_time", {"tz": "PST", "opts": {"h": [24]}})]),
    ("pythonic", "[1, 2] are numbers.", "[1, 2] are numbers.", []),
]


def _stream(parser: ToolParser, text: str, step: int = 1) -> tuple[str, list[dict]]:
    """Feed ``text`` growing by ``step`` characters; assemble the deltas as an OpenAI client would."""
    streamer = ToolCallStreamer(parser)
    content, calls = "", []
    cuts = list(range(step, len(text), step)) + [len(text)]
    for n, cut in enumerate(cuts):
        delta, call_deltas = streamer.update(text[:cut], final=n == len(cuts) - 1)
        content += delta
        for d in call_deltas:
            if d.index == len(calls):
                assert d.id and d.name, "a call's first delta carries its id and name"
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.id is None and d.name is None
                calls[d.index]["arguments"] += d.arguments
    return content, calls


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parser_on_family_output(name, text, content, calls):
    parser = get_tool_parser(name)
    whole = parser.parse(text, final=True)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls
    assert all(c.complete for c in whole.calls)
    for step in (1, 7):
        streamed_content, streamed = _stream(get_tool_parser(name), text, step)
        assert streamed_content == content or (not calls and streamed_content == text)
        if calls:  # the streamed pieces add up to the whole parse
            assert [(c["name"], c["arguments"]) for c in streamed] == [(c.name, c.arguments) for c in whole.calls]
        ids = [c["id"] for c in streamed]
        assert len(set(ids)) == len(ids)


def test_streamed_arguments_come_in_pieces_after_the_name():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "San Francisco, CA", "unit": "celsius"}}'
    streamer = ToolCallStreamer(get_tool_parser("hermes"))
    pieces = [d for cut in range(1, len(text) + 1) for d in streamer.update(text[:cut], final=False)[1]]
    assert pieces[0].name == "get_weather" and pieces[0].arguments == ""
    assert len(pieces) > 5 and "".join(p.arguments for p in pieces) == json.dumps(WEATHER)


def test_mistral_ids_are_nine_alphanumerics_and_the_registry_is_complete():
    parser = get_tool_parser("mistral")
    _, calls = _stream(parser, '[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "deepseek_v3", "openai", "pythonic"}
    with pytest.raises(ConfigError, match="'nope'.*hermes"):
        get_tool_parser("nope")


def test_required_format_array():
    text = '[{"name": "get_weather", "parameters": {"location": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    whole = RequiredToolParser().parse(text, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"location": "Paris"}),
                                                                         ("get_time", {})]
    assert _stream(RequiredToolParser(), text)[1][1]["arguments"] == "{}"


# reasoning: parser, prompt, output, expected reasoning, expected content
REASONING = [
    ("deepseek_r1", "<｜Assistant｜><think>\n", "The user says hi.\n</think>\n\nHello!", "The user says hi.\n",
     "\n\nHello!"),
    ("deepseek_r1", "<｜Assistant｜>", "<think>Short.</think>Hi.", "Short.", "Hi."),
    ("deepseek_r1", "<｜Assistant｜><think>\n", "Still thinking when cut off", "Still thinking when cut off", ""),
    ("qwen3", "<|im_start|>assistant\n", "<think>\nHmm, 2+2.\n</think>\n\n4", "\nHmm, 2+2.\n", "\n\n4"),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "4, without thinking.", "", "4, without thinking."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Open in the prompt.</think>Done.", "Open in the prompt.", "Done."),
    ("openai", "<|start|>assistant", "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final"
               "<|message|>2 + 2 = 4.<|return|>", "Add them.", "2 + 2 = 4."),
]


@pytest.mark.parametrize("name, prompt, text, reasoning, content", REASONING)
def test_reasoning_parser(name, prompt, text, reasoning, content):
    cls = reasoning_parser_class(name)
    whole = cls(prompt).split(text, final=True)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    parser = cls(prompt)
    got_r, got_c, sent_r, sent_c = "", "", 0, 0
    for cut in range(1, len(text) + 1):
        part = parser.split(text[:cut], final=cut == len(text))
        assert part.reasoning.startswith(got_r[:sent_r]) and part.content.startswith(got_c[:sent_c])
        got_r, got_c = got_r + part.reasoning[sent_r:], got_c + part.content[sent_c:]
        sent_r, sent_c = max(sent_r, len(part.reasoning)), max(sent_c, len(part.content))
    assert (got_r, got_c) == (reasoning, content)
    with pytest.raises(ConfigError, match="qwen3"):
        reasoning_parser_class("nope")


# reasoning and tool calls in one output, as Qwen3 (qwen3 + hermes) and gpt-oss (openai + openai) write them
COMBINED = [
    ("qwen3", "hermes", "<|im_start|>assistant\n",
     '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"location": "San Francisco, CA", "unit": "celsius"}}\n</tool_call>', "\nThe user wants the weather.\n", "\n\n"),
    ("openai", "openai", "<|start|>assistant",
     "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"location":"San Francisco, CA","unit":"celsius"}<|call|>',
     "Need the weather tool.", ""),
]


@pytest.mark.parametrize("reasoning, tools, prompt, text, want_reasoning, want_content", COMBINED)
def test_reasoning_then_tool_calls(reasoning, tools, prompt, text, want_reasoning, want_content):
    whole = ChoiceOutputParser(reasoning_parser_class(reasoning)(prompt), get_tool_parser(tools)).update(text, True)
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls()]
    assert (whole.reasoning, whole.content, calls) == (want_reasoning, want_content, [("get_weather", WEATHER)])
    streamed = ChoiceOutputParser(reasoning_parser_class(reasoning)(prompt), get_tool_parser(tools))
    got_reasoning, got_content, arguments = "", "", ""
    for cut in range(1, len(text) + 1):
        delta = streamed.update(text[:cut], cut == len(text))
        got_reasoning, got_content = got_reasoning + delta.reasoning, got_content + delta.content
        arguments += "".join(d.arguments for d in delta.calls)
    assert (got_reasoning, got_content, arguments) == (want_reasoning, want_content,
                                                       whole.tool_calls()[0].function.arguments)
    assert streamed.called
