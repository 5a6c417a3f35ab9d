"""Fuzz ``dockyard serve``: malformed and extreme requests over every field of both POST routes.

Driven against the session's real server process with raw HTTP (``httpx2``, the transport the
official ``openai`` client uses) and with the ``openai`` client itself. Every case says what it
expects: a 4xx status (and, where one field is at fault, that the error names it), or 200 for the
few extreme-but-valid values. Nothing may answer 5xx or kill the engine; afterwards a normal chat
must answer exactly as the model does in process, with /health 200 and no KV block held.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import httpx2
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess
from tests.server.test_server import QUESTION, _reference_chat

VOCAB = 49152  # the bundled SmolLM2's vocabulary
HUGE_INTS = [2**31, 2**63, 2**64, 10**30, -(2**63) - 1]
NON_FINITE = [math.nan, math.inf, -math.inf]
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


@dataclass
class Case:
    """One request and what it must get."""

    path: str
    body: bytes
    status: int  # expected
    param: str | None = None  # the field the error must name (a prefix of the error's param)
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    chunked: bool = False


def _body(path: str, **fields) -> dict:
    base = {"model": MODEL_NAME, "max_tokens": 1}
    base.update({"prompt": "Hi"} if path == COMPLETIONS else {"messages": QUESTION})
    for key, value in fields.items():
        if value is _DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return base


_DROP = object()


def _case(path: str, status: int = 400, param: str | None = None, **fields) -> Case:
    # json.dumps writes NaN / Infinity literals for non-finite floats, as a careless client would.
    return Case(path, json.dumps(_body(path, **fields)).encode(), status, param)


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def build_cases() -> list[Case]:
    cases: list[Case] = []
    int_fields = {COMPLETIONS: ["n", "top_k", "seed", "min_tokens", "max_tokens", "logprobs", "best_of"],
                  CHAT: ["n", "top_k", "seed", "min_tokens", "max_tokens", "max_completion_tokens", "top_logprobs"]}
    float_fields = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
    for path in (COMPLETIONS, CHAT):
        extra = {"logprobs": True} if path == CHAT else {}
        for name in int_fields[path]:
            for value in HUGE_INTS:
                valid_seed = name == "seed" and -(2**63) <= value < 2**64  # any 64-bit seed is reduced
                cases.append(_case(path, 200 if valid_seed else 400, None if valid_seed else name,
                                   **{**(extra if name == "top_logprobs" else {}), name: value}))
            for value in (1.5, "1", True, [1], {"a": 1}):
                cases.append(_case(path, 400, name, **{name: value}))
        for name in float_fields:
            for value in [*NON_FINITE, 1e308, "0.5", True, [0.5]]:
                cases.append(_case(path, 400, name, **{name: value}))
            literal = json.dumps(_body(path, **{name: 0.5})).replace('0.5', "1e400")  # parses to inf
            cases.append(Case(path, literal.encode(), 400, name))
        # token ids out of the vocabulary, in every id field
        for ids in ([VOCAB], [10**9], [2**63], [-1], [2**64], [VOCAB - 1, VOCAB]):
            cases.append(_case(path, 400, "stop_token_ids", stop_token_ids=ids, min_tokens=1))
        cases.append(_case(path, 400, "logit_bias", logit_bias={str(VOCAB): 1.0}))
        cases.append(_case(path, 400, "logit_bias", logit_bias={"1": math.nan}))
        # issue 16's table
        cases += [_case(path, 400, "top_k", top_k=2**63), _case(path, 400, "top_k", top_k=2**64, temperature=0),
                  _case(path, 400, "top_k", top_k=VOCAB + 1),
                  _case(path, 400, "stop_token_ids", stop_token_ids=[VOCAB], min_tokens=2, max_tokens=2),
                  _case(path, 400, "stop_token_ids", stop_token_ids=[10**9], min_tokens=2, max_tokens=2),
                  _case(path, 400, "stop_token_ids", stop_token_ids=[2**63], min_tokens=1)]
        # other fields of the wrong shape
        cases += [_case(path, 400, "stop", stop=[1]), _case(path, 400, "stop", stop={"a": 1}),
                  _case(path, 400, "stop", stop=[""]), _case(path, 400, "stream", stream="yes"),
                  _case(path, 400, "stream_options", stream_options={"include_usage": True}),
                  _case(path, 400, "stream_options", stream=True, stream_options=[1]),
                  _case(path, 400, "ignore_eos", ignore_eos=1), _case(path, 400, "model", model=7),
                  _case(path, 404, "model", model="x" * 10_000), _case(path, 400, "user", user=["u"]),
                  _case(path, 400, "skip_special_tokens", skip_special_tokens="no"),
                  _case(path, 400, "min_tokens", min_tokens=5, max_tokens=2),
                  _case(path, 400, "n", n=0), _case(path, 400, "n", n=129)]
        # extreme but valid: answered (one token each)
        cases += [_case(path, 200, seed=2**64 - 1), _case(path, 200, seed=-(2**63)),
                  _case(path, 200, top_k=VOCAB, temperature=0.5, seed=1),
                  _case(path, 200, stop_token_ids=[VOCAB - 1], min_tokens=1)]
        # bodies that are not what they claim, or not JSON at all
        for ctype in ("text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/jsonx", "text/json"):
            body = json.dumps(_body(path, top_k=2**63)).encode()
            cases.append(Case(path, body, 415, headers={} if ctype is None else {"Content-Type": ctype}))
        cases.append(Case(path, json.dumps(_body(path)).encode(), 403,
                          headers={**JSON, "Origin": "http://evil.example"}))
        cases.append(Case(path, b"{}", 403, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}))
        for raw in (b"", b"{", b"null", b"[]", b"42", b'"str"', b"\xff\xfe{\x00}\x00", b'{"prompt": "x"',
                    b"{'single': 'quotes'}", b'{"max_tokens": 1, "a": NaN}'):
            cases.append(Case(path, raw, 400))
        deep = 100_000
        cases.append(Case(path, f'{{"model": "{MODEL_NAME}", "stop": {_nested(deep)}}}'.encode(), 400))
        cases.append(Case(path, ('{"x": ' * deep + "1" + "}" * deep).encode(), 400))
        big = json.dumps(_body(path, user="x" * (10 * 1024 * 1024))).encode()  # 10 MB
        cases.append(Case(path, big, 413))
        cases.append(Case(path, big, 413, chunked=True))
    # completions: prompt forms and ids
    for prompt in ([[VOCAB]], [10**9], [[1, 2], [-1]], [2**63], [[2**64]], [], [[]], [1.5], ["a", 1], {"a": 1},
                   None, True, [[1], "a"], json.loads(_nested(50))):
        cases.append(_case(COMPLETIONS, 400, "prompt", prompt=prompt))
    cases.append(_case(COMPLETIONS, 400, "prompt", prompt=_DROP))
    cases += [_case(COMPLETIONS, 400, "echo", echo="true"), _case(COMPLETIONS, 400, "suffix", suffix="!"),
              _case(COMPLETIONS, 400, "max_tokens", max_tokens=0), _case(COMPLETIONS, 400, "max_tokens", max_tokens=-1),
              _case(COMPLETIONS, 400, "logprobs", logprobs=21), _case(COMPLETIONS, 400, "max_tokens", max_tokens=9000),
              _case(COMPLETIONS, 400, "prompt", prompt=[1] * 8192)]
    # chat: messages in every wrong shape
    for messages in ([], {"role": "user"}, [{"role": "tool", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [[]]}],
                     [{"role": "user", "content": "x", "name": 5}], ["hello"], [None], "hello",
                     [{"role": "user", "content": None}]):
        cases.append(_case(CHAT, 400, "messages", messages=messages))
    cases.append(_case(CHAT, 400, "messages", messages=_DROP))
    cases += [_case(CHAT, 400, "response_format.json_schema", response_format={"type": "json_schema"}),
              _case(CHAT, 400, "tools", tools=[{"type": "function"}]),
              _case(CHAT, 400, "functions", functions=[{}]),
              _case(CHAT, 400, "tool_choice", tool_choice="required"),
              _case(CHAT, 400, "top_logprobs", top_logprobs=2),
              _case(CHAT, 400, "top_logprobs", logprobs=True, top_logprobs=21),
              _case(CHAT, 400, "logprobs", logprobs=1),
              _case(CHAT, 400, "max_completion_tokens", max_completion_tokens=0)]
    return cases


def _send(client: httpx2.Client, case: Case) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **case.headers}
    if case.chunked:
        body = case.body
        chunks = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
        return client.post(case.path, content=chunks, headers=headers)
    return client.post(case.path, content=case.body, headers=headers)


def test_fuzz_requests_fail_alone_with_4xx(server: ServerProcess, reference_llm):
    cases = build_cases()
    distinct = {(c.path, c.body, tuple(sorted(c.headers.items())), c.chunked) for c in cases}
    assert len(distinct) >= 150, len(distinct)
    statuses: Counter[int] = Counter()
    wrong = []
    deaths = 0
    with httpx2.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as client:
        for case in cases:
            resp = _send(client, case)
            statuses[resp.status_code] += 1
            body = resp.json()
            error = body.get("error") if isinstance(body, dict) else None
            if resp.status_code == 503:
                deaths += 1
            ok = resp.status_code == case.status
            if ok and case.status >= 400:
                ok = error is not None and set(error) == {"message", "type", "param", "code"}
                if ok and case.param is not None:
                    ok = (error["param"] or "").startswith(case.param)
            if not ok:
                wrong.append((case.path, case.body[:120], case.headers, resp.status_code, str(body)[:300]))
        # the official client, too: the table's requests come back as BadRequestError naming the field
        oai = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        table = (({"top_k": 2**63}, "top_k"), ({"stop_token_ids": [VOCAB], "min_tokens": 2}, "stop_token_ids"),
                 ({"stop_token_ids": [2**63], "min_tokens": 1}, "stop_token_ids"))
        for extra, param in table:
            for create, prompt in ((oai.completions.create, {"prompt": "Hi"}),
                                   (oai.chat.completions.create, {"messages": QUESTION})):
                with pytest.raises(openai.BadRequestError) as info:
                    create(model=MODEL_NAME, max_tokens=2, extra_body=extra, **prompt)
                statuses[400] += 1
                assert info.value.body["param"] == param
        health = client.get("/health")
        metrics = server.metrics()
    sent = sum(statuses.values())
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    print(f"\nfuzz: {sent} requests sent ({len(distinct)} distinct raw + 6 via the openai client); "
          f"by status {dict(sorted(statuses.items()))}; 4xx {sum(n for s, n in statuses.items() if 400 <= s < 500)}, "
          f"5xx {server_errors}, engine deaths {deaths}; /health after: {health.status_code}")
    assert not wrong, wrong[:10]
    assert server_errors == 0 and deaths == 0
    assert health.status_code == 200 and server.proc.poll() is None
    assert metrics["dockyard:kv_cache_blocks_used"] == 0 and metrics["dockyard:num_requests_running"] == 0
    # and a normal chat answers as the model does in process
    resp = oai.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=0)
    assert resp.choices[0].message.content == _reference_chat(reference_llm, QUESTION, 8)
