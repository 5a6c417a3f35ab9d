"""``/v1/completions`` with ``echo`` + ``logprobs``: the prompt's logprobs, as the legacy OpenAI API gives
them and as lm-eval's ``local-completions`` model asks for them (loglikelihood requests).

The values must be the engine's ``RequestOutput.prompt_logprobs`` (checked against HF transformers in
``tests/engine/test_prompt_logprobs.py``), computed here by the in-process reference model.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest

from dockyard import SamplingParams
from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess

TOL = 1e-5  # the same fp32 CPU computation in the server process and in this one


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def _engine_prompt_logprobs(llm, prompts: list[list[int]], k: int) -> list[list[dict[int, float] | None]]:
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0)
    # In a worker thread, as the server's engine loop runs it (see tests/server/test_server.py).
    with ThreadPoolExecutor(1) as pool:
        outs = pool.submit(llm.generate, prompts, params, use_tqdm=False).result()
    return [o.prompt_logprobs for o in outs]


def _token_str(llm, tid: int) -> str:
    return llm.get_tokenizer().decode([tid], skip_special_tokens=False)


def test_echo_logprobs_max_tokens_0_with_token_ids(client, reference_llm):
    tok = reference_llm.get_tokenizer()
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is Rome.")
    resp = client.completions.create(model=MODEL_NAME, prompt=ids, echo=True, logprobs=1, max_tokens=0,
                                     temperature=0)
    (choice,) = resp.choices
    assert choice.text == tok.decode(ids)  # the prompt only: nothing generated
    assert choice.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [_token_str(reference_llm, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    (ref,) = _engine_prompt_logprobs(reference_llm, [ids], 1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i][ids[i]]) < TOL, i
        expected = {_token_str(reference_llm, t): v for t, v in ref[i].items()}  # the token and the top-1
        assert lp.top_logprobs[i].keys() == expected.keys(), i
        assert all(abs(lp.top_logprobs[i][s] - v) < TOL for s, v in expected.items()), i


def test_lm_eval_local_completions_loglikelihood_request(server, reference_llm):
    """The payload lm-eval's local-completions builds for a loglikelihood batch, parsed by lm-eval itself."""
    completions = pytest.importorskip("lm_eval.models.openai_completions")
    api = completions.LocalCompletionsAPI
    tok = reference_llm.get_tokenizer()
    context = tok.encode("Question: What is the capital of France?\nAnswer:")
    continuations = [tok.encode(" Paris"), tok.encode(" the city of London")]
    inputs = [context + c for c in continuations]
    ctxlens = [len(context)] * len(inputs)
    payload = api._create_payload(SimpleNamespace(model=MODEL_NAME), inputs, generate=False, seed=1234)
    assert payload["echo"] is True and payload["logprobs"] == 1 and payload["prompt"] == inputs
    status, body = server.call("POST", "/v1/completions", json.loads(json.dumps(payload)))
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice, ids in zip(body["choices"], inputs):
        # Prompt tokens, then the one generated token that lm-eval drops ([ctxlen:-1]).
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    got = api.parse_logprobs(outputs=body, tokens=inputs, ctxlens=ctxlens)
    refs = _engine_prompt_logprobs(reference_llm, inputs, 1)
    for (total, greedy), ids, ref, ctxlen in zip(got, inputs, refs, ctxlens):
        want = sum(ref[i][ids[i]] for i in range(ctxlen, len(ids)))
        want_greedy = all(ref[i][ids[i]] >= max(ref[i].values()) for i in range(ctxlen, len(ids)))
        assert abs(total - want) < TOL * len(ids), (total, want)
        assert greedy == want_greedy
    assert got[0][0] > got[1][0]  # " Paris" is the likelier answer


def test_echo_logprobs_with_generation_streamed_equals_plain(client, reference_llm):
    prompt = "Once upon a time, in a quiet village by the sea,"
    kwargs = dict(model=MODEL_NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=4, temperature=0)
    plain = client.completions.create(**kwargs).choices[0]
    assert plain.text.startswith(prompt) and len(plain.text) > len(prompt)
    ids = reference_llm.get_tokenizer().encode(prompt)
    lp = plain.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    for off, t in zip(lp.text_offset, lp.tokens):
        assert plain.text[off:off + len(t)] == t  # offsets index the choice's text
    (ref,) = _engine_prompt_logprobs(reference_llm, [ids], 2)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i][ids[i]]) < TOL
        assert len(lp.top_logprobs[i]) in (2, 3)  # the top 2, plus the prompt token when it is not among them

    text, tokens, values = "", [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
    assert text == plain.text
    assert tokens == lp.tokens
    assert values[0] is None and all(abs(a - b) < TOL for a, b in zip(values[1:], lp.token_logprobs[1:]))


def test_echo_logprobs_n2_and_prompt_only_stream(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=["Hello there", "Good morning"], echo=True,
                                     logprobs=0, max_tokens=2, n=2, temperature=0.7, seed=3)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for c, prompt in zip(resp.choices, ["Hello there", "Hello there", "Good morning", "Good morning"]):
        assert c.text.startswith(prompt)
        assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.tokens) == 2 + 2
    assert resp.choices[0].logprobs.token_logprobs[:2] == resp.choices[1].logprobs.token_logprobs[:2]

    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Hello there", echo=True, logprobs=1,
                                            max_tokens=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.text for ch in chunks for c in ch.choices) == "Hello there"
    assert [c.finish_reason for ch in chunks for c in ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0


@pytest.mark.parametrize("body, param, needle", [
    ({"max_tokens": 0}, "max_tokens", "echo"),
    ({"max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens", "echo"),
    ({"max_tokens": -1, "echo": True}, "max_tokens", ">= 1"),
    ({"echo": True, "logprobs": 21}, "logprobs", "<= 20"),
])
def test_invalid_echo_requests_name_the_parameter(server, body, param, needle):
    status, resp = server.call("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", **body})
    assert status == 400, resp
    assert resp["error"]["param"] == param and needle in resp["error"]["message"], resp
