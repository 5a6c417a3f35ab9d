"""Tool calling, reasoning, /tokenize and /detokenize against a real ``dockyard serve`` on the bundled model,
through the official ``openai`` client (one server for the module, started with a tool parser, a reasoning
parser and a chat template that renders tools and opens a think block).

References: ``jsonschema`` for the tool-call arguments, the HF tokenizer for /tokenize and /detokenize and
for the template's rendering, and /v1/completions on the same prompt ids for the reasoning text."""

from __future__ import annotations

import argparse
import copy
import json

import jsonschema
import openai
import pytest

from dockyard.errors import ConfigError, DockyardError
from dockyard.model_path import bundled_model_path
from dockyard.model_source import resolve_model
from dockyard.server.app import tool_and_reasoning_settings
from dockyard.server.serving import fim_prompt, fim_tokens
from tests.server.conftest import API_KEY, ServerProcess, ready_server

KEY = API_KEY  # ServerProcess.call sends it
NAME = "smol-tools"
# ChatML with Qwen's (hermes) way of showing tools, calls and results, earlier reasoning in think blocks, a
# think block opened for the answer unless enable_thinking is false (then it is closed empty, as Qwen3's
# template does), and gpt-oss's "Reasoning: <effort>" system line.
TEMPLATE = """{%- if reasoning_effort is defined %}<|im_start|>system
Reasoning: {{ reasoning_effort }}<|im_end|>
{% endif %}
{%- if tools %}<|im_start|>system
You may call these functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>
{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two small numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTIONS = ["What is the weather in Paris?", "Add 2 and 40."]
# The template closes the think block in the prompt: a constrained answer is held to its grammar from the first
# token (with the think block open, the grammar would wait for the model to close it).
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory) -> ServerProcess:
    with ready_server(tmp_path_factory, "tools", "--api-key", KEY, "--served-model-name", NAME,
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
                      "--chat-template", TEMPLATE, "--max-num-seqs", "8") as srv:
        yield srv


@pytest.fixture(scope="module")
def hf_tokenizer():
    tok = resolve_model(bundled_model_path()).load_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.base_url, api_key=KEY, max_retries=0, timeout=120)


def _assembled(stream) -> tuple[list[tuple[str, str]], str | None, str, str]:
    """Streamed chunks → (calls as (name, arguments), finish_reason, content, reasoning)."""
    calls: list[dict] = []
    finish, content, reasoning = None, "", ""
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for d in delta.tool_calls or []:
                if d.index == len(calls):
                    assert d.id and d.function.name, "a call's first delta carries its id and name"
                    calls.append({"name": d.function.name, "arguments": d.function.arguments or ""})
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return [(c["name"], c["arguments"]) for c in calls], finish, content, reasoning


@pytest.mark.parametrize("tool_choice, questions", [
    ("required", QUESTIONS), ({"type": "function", "function": {"name": "get_weather"}}, QUESTIONS[:1]),
    ({"type": "function", "function": {"name": "add"}}, QUESTIONS[1:])],
    ids=["required", "named-get_weather", "named-add"])
def test_required_and_named_tool_calls_validate_streamed_and_not(client, tool_choice, questions):
    for i, question in enumerate(questions):
        kwargs = dict(model=NAME, messages=[{"role": "user", "content": question}], tools=TOOLS,
                      tool_choice=tool_choice, max_tokens=120, temperature=0.9, seed=100 + i, extra_body=NO_THINK)
        out = client.chat.completions.create(**kwargs)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert calls and choice.message.content is None
        for name, arguments in calls:
            if isinstance(tool_choice, dict):
                assert name == tool_choice["function"]["name"]
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        streamed, finish, content, _ = _assembled(client.chat.completions.create(**kwargs, stream=True))
        assert (streamed, finish, content) == (calls, "tool_calls", "")


def test_auto_tool_choice_reads_hermes_calls_from_a_live_answer(client):
    """tool_choice auto with the server's hermes parser: a regex (structured outputs) makes the small model
    write a call in Hermes' format, which comes back as tool_calls, streamed and not."""
    regex = r'<tool_call>\n\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}\n</tool_call>'
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": QUESTIONS[1]}], tools=TOOLS, max_tokens=60,
                  temperature=0.9, seed=3, extra_body={"structured_outputs": {"regex": regex}, **NO_THINK})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert len(calls) == 1 and calls[0][0] == "add"
    jsonschema.validate(json.loads(calls[0][1]), SCHEMAS["add"])
    streamed, finish, content, _ = _assembled(client.chat.completions.create(**kwargs, stream=True))
    assert (streamed, finish, content) == (calls, "tool_calls", "")


def test_parallel_tool_calls_false_gives_one_call(client):
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                         tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                         max_tokens=120, temperature=0.9, seed=7, extra_body=NO_THINK)
    assert len(out.choices[0].message.tool_calls) == 1


def _completion_of(client, tool_server, messages, **template) -> str:
    """The greedy completion of the chat's prompt ids (taken from /tokenize), as plain text."""
    status, body = tool_server.call("POST", "/tokenize", {"model": NAME, "messages": messages, **template})
    assert status == 200, body
    return client.completions.create(model=NAME, prompt=body["tokens"], max_tokens=24, temperature=0).choices[0].text


def test_reasoning_content_live_streamed_and_not(client, tool_server):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    text = _completion_of(client, tool_server, messages)
    assert "</think>" not in text  # so all of it is reasoning: the think block stays open
    kwargs = dict(model=NAME, messages=messages, max_tokens=24, temperature=0)
    out = client.chat.completions.create(**kwargs).choices[0].message
    assert (out.reasoning_content, out.content) == (text, None)
    _, _, content, reasoning = _assembled(client.chat.completions.create(**kwargs, stream=True))
    assert (reasoning, content) == (text, "")
    # enable_thinking false: the template closes the think block, and the whole answer is content
    text = _completion_of(client, tool_server, messages, **NO_THINK)
    out = client.chat.completions.create(**kwargs, extra_body=NO_THINK).choices[0].message
    assert (out.reasoning_content, out.content) == (None, text)


def test_reasoning_effort_and_earlier_reasoning_reach_the_template(client, hf_tokenizer):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
                {"role": "user", "content": "bye"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=1, reasoning_effort="high")
    want = hf_tokenizer.apply_chat_template(messages, reasoning_effort="high", tokenize=False,
                                            add_generation_prompt=True)
    assert "Reasoning: high" in want and "<think>Greet back.</think>Hello." in want
    assert out.usage.prompt_tokens == len(hf_tokenizer.encode(want, add_special_tokens=False))


def test_tokenize_detokenize_round_trip_against_hf(tool_server, hf_tokenizer):
    prompt = "Hello, world! Ça va? 12345 <|im_start|>"
    for add in (True, False):
        status, body = tool_server.call("POST", "/tokenize", {"model": NAME, "prompt": prompt,
                                                              "add_special_tokens": add, "return_token_strs": True})
        assert status == 200
        assert body["tokens"] == hf_tokenizer.encode(prompt, add_special_tokens=add)
        assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] > 0
        status, back = tool_server.call("POST", "/detokenize", {"model": NAME, "tokens": body["tokens"]})
        assert status == 200 and back["prompt"] == hf_tokenizer.decode(body["tokens"])
    status, err = tool_server.call("POST", "/detokenize", {"tokens": [len(hf_tokenizer) + 5]})
    assert status == 400 and err["error"]["param"] == "tokens.0"
    status, err = tool_server.call("POST", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]})
    assert status == 400 and err["error"]["param"] == "prompt"


def test_history_with_tool_calls_renders_through_the_template(tool_server, hf_tokenizer):
    """Assistant tool_calls (arguments as JSON text on the wire, objects for the template) and tool results."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    status, body = tool_server.call("POST", "/tokenize", {"model": NAME, "messages": messages, "tools": TOOLS})
    assert status == 200, body
    hf_call = {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    hf_messages = [{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [hf_call]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    text = hf_tokenizer.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    assert '"arguments": {"city": "Paris", "unit": "celsius"}' in text and "18 degrees" in text


def test_tool_request_errors_name_the_field(tool_server):
    base = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
              "tool_choice.function.name"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tools": TOOLS + TOOLS[:1]}, "tools.2.function.name"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
                 {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{bad"}}]}]},
              "messages.1.tool_calls.0.function.arguments"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages.0.content.0"),
             ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
             ({"reasoning_effort": "extreme"}, "reasoning_effort"),
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}],
               "tool_choice": "required"}, "tools"),  # the function's schema does not compile
             ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice")]
    for extra, param in cases:
        status, body = tool_server.call("POST", "/v1/chat/completions", {**base, **extra})
        assert status == 400 and body["error"]["param"] == param, (extra, body)
    status, body = tool_server.call("POST", "/v1/completions", {"model": NAME, "prompt": "def f(", "suffix": "\n"})
    assert status == 400 and body["error"]["param"] == "suffix" and "<fim_prefix>" in body["error"]["message"]


def test_refusal_parts_in_an_assistant_history_are_text(client):
    out = client.chat.completions.create(model=NAME, max_tokens=2, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "user", "content": [{"type": "text", "text": "ok"}]}])
    assert out.choices[0].finish_reason in ("length", "stop")


def test_serve_flags_are_checked_before_the_model_loads():
    def args(**kw):
        return argparse.Namespace(**{"enable_auto_tool_choice": False, "tool_call_parser": None,
                                     "reasoning_parser": None, **kw})

    with pytest.raises(DockyardError, match="--tool-call-parser"):
        tool_and_reasoning_settings(args(enable_auto_tool_choice=True))
    with pytest.raises(ConfigError, match="'nope'.*hermes"):
        tool_and_reasoning_settings(args(tool_call_parser="nope"))
    with pytest.raises(ConfigError, match="deepseek_r1"):
        tool_and_reasoning_settings(args(reasoning_parser="nope"))
    assert tool_and_reasoning_settings(args(tool_call_parser="pythonic"))["tool_call_parser"] == "pythonic"


def test_suffix_prompt_uses_the_tokenizers_fim_tokens(hf_tokenizer):
    """StarCoder's published fill-in-the-middle prompt: <fim_prefix>PREFIX<fim_suffix>SUFFIX<fim_middle>."""
    assert fim_tokens(hf_tokenizer) is None  # the bundled model has none: suffix is a 400 (above)
    tok = copy.deepcopy(hf_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]})
    fim = fim_tokens(tok)
    assert fim_prompt(fim, "def add(a, b):\n", "\n    return c") == \
        "<fim_prefix>def add(a, b):\n<fim_suffix>\n    return c<fim_middle>"


# Earlier turns that reason briefly and answer in JSON: the small model copies the pattern and closes its own
# think block, after which the grammar holds the answer.
FEW_SHOT = [{"role": "user", "content": "Name a city."},
            {"role": "assistant", "reasoning_content": "\nParis is a city.\n", "content": '{"name": "Paris"}'},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "reasoning_content": "\nRed is a color.\n", "content": '{"name": "Red"}'}]
FRUIT = {"type": "object", "properties": {"name": {"type": "string", "enum": ["Apple", "Banana", "Cherry"]},
                                          "sweet": {"type": "boolean"}},
         "required": ["name", "sweet"], "additionalProperties": False}


def test_structured_output_starts_after_the_reasoning(client):
    """With --reasoning-parser and the think block open, a json_schema answer reasons freely first:
    reasoning_content holds the think part, content the constrained JSON (streamed and not)."""
    kwargs = dict(model=NAME, messages=FEW_SHOT + [{"role": "user", "content": "Name a fruit."}], max_tokens=60,
                  temperature=0, response_format={"type": "json_schema", "json_schema": {
                      "name": "fruit", "schema": FRUIT, "strict": True}})
    out = client.chat.completions.create(**kwargs).choices[0]
    assert out.finish_reason == "stop"
    assert out.message.reasoning_content and "</think>" not in out.message.reasoning_content
    jsonschema.validate(json.loads(out.message.content), FRUIT)
    _, finish, content, reasoning = _assembled(client.chat.completions.create(**kwargs, stream=True))
    assert (reasoning, content, finish) == (out.message.reasoning_content, out.message.content, "stop")


def test_named_tool_choice_starts_after_the_reasoning(client):
    messages = FEW_SHOT + [{"role": "user", "content": "Add 2 and 40."}]
    out = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=80, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.reasoning_content and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["add"])
