"""Structured outputs and logit_bias through ``dockyard serve``, as the official ``openai`` client sends them.

The session's server (bundled SmolLM2-135M-Instruct, CPU). 20 requests over 10 JSON schemas (nested
objects, arrays, enums, numbers with ranges, required / optional, ``$defs``, unions, patterns), sent
concurrently so the engine batches them, through every spelling (``response_format``, vLLM's
``structured_outputs``, ``guided_json``), on chat and completions, greedy and seeded: every output parses and
validates with ``jsonschema`` (an independent validator). Regex, choice and json_object likewise; invalid
constraints are 400s naming the field; logit_bias moves the greedy choice.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess

ADDRESS = {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
           "required": ["street", "city"]}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {
        "order_id": {"type": "integer"},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                     "required": ["name"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["sku", "qty"]}}},
     "required": ["order_id", "customer", "items"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"type": "string", "enum": ["S", "M", "L"]}},
     "required": ["color", "size"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60},
                                      "humidity": {"type": "integer", "minimum": 0, "maximum": 100}},
     "required": ["temperature", "humidity"]},
    {"type": "object", "properties": {"title": {"type": "string"}, "subtitle": {"type": "string"},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
     "required": ["title", "year"]},
    {"$defs": {"address": ADDRESS, "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "home": {"$ref": "#/$defs/address"}}, "required": ["name", "home"]}},
     "type": "object", "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"},
                                                 "minItems": 1, "maxItems": 2}},
     "required": ["people"]},
    {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"active": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
     "required": ["active", "note"]},
    {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"radius": {"type": "number", "minimum": 0}}, "required": ["radius"]},
        {"type": "object", "properties": {"side": {"type": "number", "minimum": 0}}, "required": ["side"]}]}},
     "required": ["shape"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "version": {"const": 2}, "tags": {"type": "array", "items": {"type": "integer"},
                                                                        "maxItems": 3}},
     "required": ["code", "version"]},
]
# A tiny model may ramble in free whitespace: JSON without it (vLLM's option), and room to finish.
NO_WHITESPACE = {"structured_outputs": {"disable_any_whitespace": True}}
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=600)


def _prompt(schema: dict) -> str:
    return f"Answer with JSON that follows this schema: {json.dumps(schema)}"


async def _schema_request(client: openai.AsyncOpenAI, i: int, schema: dict) -> tuple[str, str]:
    """Request ``i`` (of 20) for ``schema``; (text, finish_reason). Spelling, endpoint and sampling rotate."""
    sampling = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.7, "seed": i}
    spelling = i % 4
    if spelling in (0, 1):  # chat, OpenAI's response_format (+ vLLM's whitespace option)
        resp = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": _prompt(schema)}], max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                    "strict": True}},
            extra_body=NO_WHITESPACE, **sampling)
        return resp.choices[0].message.content, resp.choices[0].finish_reason
    if spelling == 2:  # completions, vLLM's structured_outputs
        resp = await client.completions.create(
            model=MODEL_NAME, prompt=_prompt(schema) + "\n", max_tokens=MAX_TOKENS,
            extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}}, **sampling)
        return resp.choices[0].text, resp.choices[0].finish_reason
    resp = await client.chat.completions.create(  # chat, the older guided_json
        model=MODEL_NAME, messages=[{"role": "user", "content": _prompt(schema)}], max_tokens=MAX_TOKENS,
        extra_body={"guided_json": schema, **NO_WHITESPACE}, **sampling)
    return resp.choices[0].message.content, resp.choices[0].finish_reason


def test_twenty_requests_over_ten_schemas_all_validate(aclient):
    jobs = [(i, SCHEMAS[i % len(SCHEMAS)]) for i in range(20)]

    async def run_all() -> list[tuple[str, str]]:
        return await asyncio.gather(*(_schema_request(aclient, i, s) for i, s in jobs))

    results = asyncio.run(run_all())
    for (i, schema), (text, finish_reason) in zip(jobs, results):
        assert finish_reason == "stop", f"request {i} did not finish the JSON: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_json_object(client):
    chat = [{"role": "user", "content": "When was the Eiffel Tower built? Then name a colour."}]
    pattern = r"(19|18)[0-9]{2}, [a-z]{3,8}"
    for body in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        resp = client.chat.completions.create(model=MODEL_NAME, messages=chat, max_tokens=30, temperature=0.8,
                                              seed=3, extra_body=body)
        assert re.fullmatch(pattern, resp.choices[0].message.content), resp.choices[0].message.content
    choices = ["Paris", "London", "Rome"]
    resp = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=10, n=3,
                                     temperature=1.0, seed=1, extra_body={"guided_choice": choices})
    assert len(resp.choices) == 3 and all(c.text in choices and c.finish_reason == "stop" for c in resp.choices)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=chat, max_tokens=10,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert resp.choices[0].message.content in ("yes", "no")
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Give a JSON object with the name and country of "
                                                                "the capital of France."}],
        max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"}, extra_body=NO_WHITESPACE)
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_streamed_json_assembles_to_valid_json(client):
    schema = SCHEMAS[2]
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": _prompt(schema)}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, response_format={"type": "json_schema", "json_schema": {"name": "c",
                                                                                         "schema": schema}},
        extra_body=NO_WHITESPACE)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kwargs, param, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "numbr"}}}},
     "response_format.json_schema.schema", "numbr"),
    ({"extra_body": {"guided_regex": "([0-9]"}}, "guided_regex", "regular expression"),
    ({"extra_body": {"structured_outputs": {"grammar": "root ::= missing"}}}, "structured_outputs.grammar",
     "missing"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}}, "structured_outputs",
     "exactly one"),
    ({"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}}, "guided_regex", "not several"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "non-empty"),
    ({"extra_body": {"guided_decoding_backend": "outlines", "guided_regex": "a"}}, "guided_decoding_backend",
     "xgrammar"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"logit_bias": {"49152": 5}}, "logit_bias", "vocabulary"),
])
def test_invalid_constraints_are_400_naming_the_field(client, kwargs, param, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, **kwargs)
    error = info.value.body
    assert error["param"] == param and needle in error["message"], error


def test_logit_bias_moves_the_greedy_choice(client, reference_llm):
    token = 42
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0,
                                     logit_bias={str(token): 100})
    assert resp.choices[0].text == reference_llm.get_tokenizer().decode([token] * 3)
