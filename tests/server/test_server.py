"""``dockyard serve`` as clients see it: the official ``openai`` client against a real server process.

One server (bundled SmolLM2-135M-Instruct, CPU, shared with the other modules of tests/server) serves
every test here but the SIGTERM one, which stops a server of its own: under pytest-xdist the modules
run in no fixed order. Requests are greedy or seeded and short, to stay fast.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dockyard import SamplingParams
from tests.server.conftest import API_KEY, MODEL_NAME, ServerProcess, start_server, wait_for_health

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def _reference_chat(llm, messages, max_tokens: int) -> str:
    ids = llm.get_tokenizer().encode(llm.apply_chat_template(messages), add_special_tokens=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    # Run it in a worker thread, as the server's engine loop does: on a CPU shared with other busy
    # processes, torch's intra-op threads driven from the main thread can be ~25x slower.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(llm.generate, [ids], params, use_tqdm=False).result()[0].outputs[0].text


def _wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


# ---------------------------------------------------------------- readiness
def test_health_is_503_until_warm_up_then_200(server):
    first_status, first_body = server.health_before_ready[0]
    assert first_status == 503
    assert first_body["status"] == "starting"
    status, body = server.call("GET", "/health", auth=False)
    assert (status, body) == (200, {"status": "ok"})
    log = server.log()
    assert f"at http://127.0.0.1:{server.port}/v1" in log  # the start-up log says which address to use
    # the warm-up request really went through the engine before "ready"
    assert server.metrics()["dockyard:http_requests_received_total{endpoint=\"chat\"}"] >= 1


def test_version(server):
    status, body = server.call("GET", "/version", auth=False)
    assert status == 200 and body["version"]


# ---------------------------------------------------------------- the openai client
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].max_model_len == 8192
    assert "/" not in models.data[0].root  # the model's name, never its path on the server's disk


def test_models_retrieve(client):
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == "model_not_found" and "gpt-4" in info.value.body["message"]


def test_chat_plain(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=16, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_streamed_equals_plain(client):
    kw = dict(model=MODEL_NAME, messages=QUESTION, max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_completion_plain_and_streamed(client):
    kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw)
    assert plain.object == "text_completion"
    assert plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_prompt_forms(client):
    tok_ids = [504, 2365, 6354, 16438]
    resp = client.completions.create(model=MODEL_NAME, prompt=[tok_ids, tok_ids[:2]], max_tokens=3, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.prompt_tokens == 6
    resp = client.completions.create(model=MODEL_NAME, prompt=["One", "Two"], max_tokens=3, temperature=0, echo=True)
    assert resp.choices[0].text.startswith("One") and resp.choices[1].text.startswith("Two")


def test_n2(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, n=2, temperature=1.0,
                                          seed=1)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens <= 16
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, n=2,
                                            temperature=1.0, seed=1, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].text
    assert all(texts.values())


def test_stop_strings(client):
    kw = dict(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 8"])
    plain = client.completions.create(**kw)
    assert plain.choices[0].text == " 5, 6, 7,"
    assert plain.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == plain.choices[0].text  # the held-back " " before " 8" was never sent


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model=MODEL_NAME, prompt="My favourite animal is", max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert item.top_logprobs[0].token == item.token  # greedy takes the most likely token
        assert item.logprob == pytest.approx(lps[0])
        assert bytes(item.bytes).decode() == item.token
    assert "".join(i.token for i in content).startswith(resp.choices[0].message.content[:5])


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(value) and max(top.values()) == pytest.approx(value)


def test_greedy_chat_equals_llm_generate(client, reference_llm):
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three colours of the rainbow."}]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert resp.choices[0].message.content == _reference_chat(reference_llm, messages, 24)


# ---------------------------------------------------------------- concurrency and disconnects
def test_64_concurrent_streams_are_correct_and_free_the_kv_pool(server):
    """64 streaming clients at once (half chat, half completions, greedy, distinct prompts): each stream's
    text equals the same request answered non-streamed, so nothing was lost, duplicated or interleaved."""
    max_tokens = 8
    chat_msgs = {i: [{"role": "user", "content": f"Write the number {i} in words."}] for i in range(1, 64, 2)}
    prompts = {i: f"Item {i}: the list of {i * 3} things starts with" for i in range(0, 64, 2)}

    async def one(client: openai.AsyncOpenAI, i: int, stream: bool) -> str:
        kw = dict(model=MODEL_NAME, max_tokens=max_tokens, temperature=0, stream=stream)
        if i in chat_msgs:
            resp = await client.chat.completions.create(messages=chat_msgs[i], **kw)
            if not stream:
                return resp.choices[0].message.content
            return "".join([c.choices[0].delta.content or "" async for c in resp if c.choices])
        resp = await client.completions.create(prompt=prompts[i], **kw)
        if not stream:
            return resp.choices[0].text
        return "".join([c.choices[0].text async for c in resp])

    async def all_at_once(stream: bool) -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*(one(client, i, stream) for i in range(64)))

    before = server.metrics()
    got = asyncio.run(all_at_once(stream=True))
    after = server.metrics()
    steps = after["dockyard:engine_steps_total"] - before["dockyard:engine_steps_total"]
    assert steps < 64 * max_tokens / 4, steps  # they really ran batched together
    assert after["dockyard:kv_cache_blocks_used"] == 0
    assert after["dockyard:num_requests_running"] == 0 and after["dockyard:num_requests_waiting"] == 0
    assert after["dockyard:kv_cache_blocks_free"] == after["dockyard:kv_cache_blocks_total"]

    expected = asyncio.run(all_at_once(stream=False))
    mismatches = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatches, mismatches[:5]
    assert len(set(got)) > 48  # distinct answers, so a mix-up between streams could not go unseen
    assert server.metrics()["dockyard:kv_cache_blocks_used"] == 0


def _aborted(server: ServerProcess) -> float:
    return server.metrics()['dockyard:request_success_total{finished_reason="abort"}']


def test_client_disconnect_mid_stream_aborts(server, client):
    aborted = _aborted(server)
    stream = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=2000, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metrics()["dockyard:num_requests_running"] == 1
    stream.close()  # the client goes away mid-stream
    _wait_until(lambda: _aborted(server) == aborted + 1, what="the abort to show in /metrics")
    m = server.metrics()
    assert m["dockyard:kv_cache_blocks_used"] == 0 and m["dockyard:num_requests_running"] == 0
    # and the server keeps serving
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert resp.usage.completion_tokens == 3


def test_client_disconnect_while_waiting_for_plain_response_aborts(server):
    aborted = _aborted(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    _wait_until(lambda: server.metrics()["dockyard:num_requests_running"] == 1, what="the request to run")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_until(lambda: _aborted(server) == aborted + 1, what="the abort to show in /metrics")
    assert server.metrics()["dockyard:kv_cache_blocks_used"] == 0


# ---------------------------------------------------------------- errors
def _assert_error(resp: tuple[int, dict | str], status: int, param: str | None = None, *needles: str) -> dict:
    got_status, body = resp
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    for needle in needles:
        assert needle in body["error"]["message"], body
    return body["error"]


def _chat(**kw) -> dict:
    return {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, **kw}


def _completion(**kw) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4, **kw}


@pytest.mark.parametrize("path, body, param, needles", [
    ("/v1/chat/completions", _chat(n=1000), "n", ["<= 128", "1000"]),
    ("/v1/chat/completions", _chat(temperature=-1), "temperature", ["[0, 10000]", "-1"]),
    ("/v1/chat/completions", _chat(top_p=0), "top_p", ["(0, 1]"]),
    ("/v1/chat/completions", _chat(max_tokens=0), "max_tokens", [">= 1"]),
    ("/v1/chat/completions", _chat(max_completion_tokens=-5), "max_completion_tokens", [">= 1"]),
    ("/v1/chat/completions", _chat(top_logprobs=50, logprobs=True), "top_logprobs", ["<= 20"]),
    ("/v1/chat/completions", _chat(max_completion_tokens=2**40), "max_completion_tokens", ["2147483647"]),
    ("/v1/chat/completions", _chat(top_logprobs=2), "top_logprobs", ["logprobs=true"]),
    ("/v1/chat/completions", _chat(messages=[]), "messages", ["at least one"]),
    ("/v1/chat/completions", _chat(messages=[{"role": "tool", "content": "x"}]), "messages.0.tool_call_id", []),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages.0.content.0", ["only text"]),
    ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}),
     "response_format.json_schema.schema", ["JSON schema", "x"]),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice",
     ["--enable-auto-tool-choice", "--tool-call-parser"]),
    ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                   tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", ["'g'", "'f'"]),
    ("/v1/chat/completions", _chat(n="2"), "n", ["valid integer"]),
    ("/v1/chat/completions", _chat(stream_options={"include_usage": True}), "stream_options", ["stream=true"]),
    ("/v1/chat/completions", {"model": MODEL_NAME}, "messages", ["required"]),
    ("/v1/completions", _completion(max_tokens=0), "max_tokens", [">= 1", "echo=true"]),
    ("/v1/completions", _completion(suffix="!"), "suffix", ["not supported"]),
    ("/v1/completions", _completion(best_of=3), "best_of", []),
    ("/v1/completions", _completion(logit_bias={"99999999": 5}), "logit_bias", ["vocabulary"]),
    ("/v1/completions", _completion(prompt=[]), "prompt", []),
    ("/v1/completions", _completion(prompt=[10**9]), "prompt", ["vocabulary"]),
    ("/v1/completions", _completion(stop=[1, 2]), "stop", []),
    ("/v1/completions", _completion(seed=2**70), "seed", []),
    ("/v1/completions", _completion(max_tokens=9000), "max_tokens", ["8192", "9000", "9001"]),
    ("/v1/completions", _completion(prompt=[1] * 8192), "prompt", ["8192 tokens"]),
])
def test_invalid_parameters_are_400_naming_the_parameter(server, path, body, param, needles):
    _assert_error(server.call("POST", path, body), 400, param, *needles)


def test_error_statuses(server):
    _assert_error(server.call("POST", "/v1/chat/completions", _chat(model="gpt-4")), 404, "model", "gpt-4")
    err = _assert_error(server.call("GET", "/v1/models", auth=False), 401)
    assert err["code"] == "invalid_api_key"
    _assert_error(server.call("GET", "/v1/models", auth=False, headers={"Authorization": "Bearer wrong"}), 401)
    assert server.call("GET", "/health", auth=False)[0] == 200  # no key needed outside /v1
    _assert_error(server.call("POST", "/v1/completions", b"{not json"), 400, None, "not valid JSON")
    _assert_error(server.call("POST", "/v1/completions", b'["a list"]'), 400, None, "object")
    _assert_error(server.call("GET", "/v1/nowhere"), 404)
    big = json.dumps(_completion(prompt="x " * (5 * 1024 * 1024))).encode()
    _assert_error(server.call("POST", "/v1/completions", big), 413, None, "limit")


def test_oversized_chunked_body_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = (b"x" * (1 << 20) for _ in range(10))  # 10 MiB with no Content-Length
    conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                 headers={"Authorization": f"Bearer {API_KEY}", "Transfer-Encoding": "chunked",
                          "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, n=500)
    assert info.value.status_code == 400 and "n must be" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    bad = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_malformed_request_batch_leaves_server_healthy(server, client):
    junk = [b"", b"{", b"null", b"[]", b"42", b'{"messages": "hi"}', b'{"messages": [{"role": "user"}]}',
            b'{"messages": [{"content": "x"}]}', b'{"prompt": {"a": 1}}', b'{"prompt": "x", "max_tokens": -1}',
            b'{"prompt": "x", "n": 100000}', b'{"prompt": "x", "temperature": "NaN"}', b"\xff\xfe\x00garbage",
            b'{"prompt": "x", "top_k": -7}', b'{"prompt": "x", "stop": {"a": 1}}', b'{"messages": []}',
            json.dumps({"prompt": "x", "n": 128, "max_tokens": 10**9}).encode()]
    for body in junk:
        for path in ("/v1/completions", "/v1/chat/completions"):
            status, resp = server.call("POST", path, body)
            assert status == 400, (path, body, resp)
            assert "error" in resp
    assert server.call("GET", "/health", auth=False)[0] == 200
    resp = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=3)
    assert resp.usage.completion_tokens > 0
    m = server.metrics()
    assert m["dockyard:kv_cache_blocks_used"] == 0 and m["dockyard:num_requests_waiting"] == 0


# ---------------------------------------------------------------- shutdown
@pytest.fixture
def server_to_stop(tmp_path, bundled_gguf) -> Iterator[ServerProcess]:
    """A server of this test's own (SIGTERM ends it; the shared one must outlive every module using it)."""
    srv = start_server(tmp_path, "--api-key", API_KEY, "--served-model-name", MODEL_NAME)
    wait_for_health(srv, 200)
    yield srv
    srv.stop()


def test_sigterm_aborts_in_flight_and_exits_0(server_to_stop):
    server = server_to_stop
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(200)
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()  # the stream ends: an error event, then [DONE]
    conn.close()
    assert "the server is shutting down" in rest
    assert rest.rstrip().endswith("data: [DONE]")
    assert server.proc.wait(timeout=60) == 0, server.log()[-2000:]
    log = server.log()
    assert "shutting down" in log and "Traceback" not in log
